/* The hyper-connection "post" mix as a CPU custom op (ggml 0.20.2's ggml_dsv4_hc_post computes the same,
 * several times slower on the CPU in prompt processing):
 *
 *   out[i, dst, t] = x[i, t] * post[dst, t] + sum_src residual[i, src, t] * comb[dst, src, t]
 *
 * x [D, n], residual [D, hc, n], post [hc, n], comb [hc(dst), hc(src), n], all F32 with contiguous rows;
 * returns [D, hc, n] F32, or NULL when the shapes do not fit (hc > 16). Use only on CPU-only backend sets. */
#ifndef LLAMA_DSV4_HC_H
#define LLAMA_DSV4_HC_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor * dsv4_hc_post_cpu(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * residual,
                                      struct ggml_tensor * post, struct ggml_tensor * comb);

#ifdef __cplusplus
}
#endif

#endif
