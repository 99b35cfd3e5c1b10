/* ggml_concat as a CPU custom op that copies whole rows (ggml 0.20.2's CPU concat copies element by element with
 * the full index arithmetic for each, and splits the work only along dim 2: a decode step's concatenations of the
 * attention window with the selected compressed entries, of the rotated and plain parts of each head, ran on one
 * thread at a few ns per element; 13 % of a demo-model decode step, perf, 2026-12-06).
 *
 *   dsv4_concat_cpu(ctx, a, b, dim)   the tensor ggml_concat(ctx, a, b, dim) computes, the same bytes
 *
 * a and b: the same non-quantized type, rows contiguous (nb[0] the element size; any strides above), the shapes
 * equal but in dim. Returns NULL when they are not (the caller falls back to ggml_concat). CPU-only backend sets. */
#ifndef LLAMA_DSV4_CONCAT_H
#define LLAMA_DSV4_CONCAT_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor * dsv4_concat_cpu(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b,
                                     int dim);

#ifdef __cplusplus
}
#endif

#endif
