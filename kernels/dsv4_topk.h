/* Top-k indices per row with the reference's tie-breaking, as a CPU custom op.
 *
 * The lightning indexer's scores are sums of relu(.) terms, so exact ties (zeros) are common, and which tied
 * entry is kept changes the attention. This kernel selects like a heap select (a min-heap of the first k
 * indices, then every later element strictly greater than the heap's weakest replaces it), which is what the
 * reference's CPU top-k does, so both keep the same entries on ties. The output order is unspecified. */
#ifndef LLAMA_DSV4_TOPK_H
#define LLAMA_DSV4_TOPK_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Select k indices (I32) per row of the F32 matrix a [n, rows]; returns [k, rows]. NULL if k is not in [1, n]. */
struct ggml_tensor * dsv4_top_k(struct ggml_context * ctx, struct ggml_tensor * a, int k);

/* The selection itself, on one row (exposed for tests): writes k indices of x[0..n) into out. */
void dsv4_top_k_row(const float * x, int n, int k, int * out);

#ifdef __cplusplus
}
#endif

#endif
