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

/* The hyper-connection pre and post gates from the mixer's output, in one CPU custom op (the graph spelled them in 8
 * small nodes per mix, each a meeting of ggml's threads: 11 mixes per demo-model decode step):
 *
 *   out[i, t, 0] = sigmoid(mix[i, t] * scale[0] + base[i]) + eps                 (pre, i < hc)
 *   out[i, t, 1] = 2 * sigmoid(mix[hc + i, t] * scale[1] + base[hc + i])          (post; only when n_gates == 2)
 *
 * mix [M, n] (M >= n_gates * hc), scale [>= n_gates], base [>= n_gates * hc], all F32 with contiguous rows; returns
 * [hc, n, n_gates] F32 (each gate a contiguous [hc, n] view), the bytes of the ggml ops it replaces (each step is
 * rounded as theirs: the product, the sum, ggml's 1 / (1 + expf(-x)), then eps or the factor 2), or NULL when the
 * shapes do not fit. */
struct ggml_tensor * dsv4_hc_gates_cpu(struct ggml_context * ctx, struct ggml_tensor * mix, struct ggml_tensor * scale,
                                       struct ggml_tensor * base, int hc, int n_gates, float eps);

struct ggml_tensor * dsv4_hc_post_cpu(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * residual,
                                      struct ggml_tensor * post, struct ggml_tensor * comb);

#ifdef __cplusplus
}
#endif

#endif
