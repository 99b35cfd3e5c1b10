/* DeepSeek V4 operations that ggml 0.20.2 lacks, composed from portable ggml ops so that they run
 * on every backend (CPU, CUDA, Metal). Each is unit-tested against numpy in tests/test_kernels.py.
 *
 *   dsv4_swiglu_clamp     silu(min(gate, limit)) * clamp(up, -limit, limit)   (newer ggml: ggml_swiglu_clamp)
 *   dsv4_rope_tail        RoPE (ggml NORMAL mode, YaRN) on the LAST n_rot dims of each head
 *   dsv4_rope_tail_back   its inverse (the "de-rope" applied to DSV4 attention outputs)
 *                         (newer ggml: ggml_rope_set_offset on ggml_rope_ext / ggml_rope_ext_back)
 */
#ifndef LLAMA_DSV4_OPS_H
#define LLAMA_DSV4_OPS_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The rotary parameter set of one layer (docs/architecture.md §5.4). */
struct dsv4_rope_params {
    int   n_ctx_orig;
    float freq_base;
    float freq_scale;
    float ext_factor;
    float attn_factor;
    float beta_fast;
    float beta_slow;
};

/* gate, up: F32 tensors of the same shape. Both are consumed (clamped in place): pass fresh
 * intermediate results, never weights or tensors that other nodes read. A limit <= 1e-6 disables
 * the clamp (plain SwiGLU), as in the reference. */
struct ggml_tensor * dsv4_swiglu_clamp(struct ggml_context * ctx, struct ggml_tensor * gate,
                                       struct ggml_tensor * up, float limit);

/* How the rope ops join a head's plain and rotated parts: ggml_concat's signature (NULL: ggml_concat itself; a
 * CPU-only graph passes dsv4_concat_cpu, kernels/dsv4_concat.h). */
typedef struct ggml_tensor * (*dsv4_concat_fn)(struct ggml_context * ctx, struct ggml_tensor * a,
                                               struct ggml_tensor * b, int dim);

/* x: F32 [head_dim, n_head, n_tokens] (may be a strided view); pos: I32 [n_tokens].
 * Returns a new contiguous tensor of x's shape: dims [0, head_dim - n_rot) copied, dims
 * [head_dim - n_rot, head_dim) rotated in adjacent pairs. Returns NULL if the shapes do not fit
 * (n_rot odd, n_rot > head_dim, pos length != n_tokens, 4-D input). */
struct ggml_tensor * dsv4_rope_tail(struct ggml_context * ctx, struct ggml_tensor * x,
                                    struct ggml_tensor * pos, int n_rot,
                                    const struct dsv4_rope_params * p, dsv4_concat_fn cat);

struct ggml_tensor * dsv4_rope_tail_back(struct ggml_context * ctx, struct ggml_tensor * x,
                                         struct ggml_tensor * pos, int n_rot,
                                         const struct dsv4_rope_params * p, dsv4_concat_fn cat);

#ifdef __cplusplus
}
#endif

#endif
