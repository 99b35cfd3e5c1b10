/* See dsv4_hc.h. */
#include "dsv4_hc.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HC 16

#define AT(t, i1, i2) ((const float *) ((const char *) (t)->data + (i1) * (t)->nb[1] + (i2) * (t)->nb[2]))

/* Rows [i0, i1) of every stream of token t. */
static void post_token(struct ggml_tensor * dst, int64_t t, int64_t i0, int64_t i1) {
    const struct ggml_tensor *x = dst->src[0], *res = dst->src[1], *post = dst->src[2], *comb = dst->src[3];
    const int64_t hc = res->ne[1];
    const float * xt = AT(x, t, 0);
    const float * pt = AT(post, t, 0);
    for (int64_t d = 0; d < hc; d++) {
        float * out = (float *) ((char *) dst->data + d * dst->nb[1] + t * dst->nb[2]);
        const float p = pt[d];
        for (int64_t i = i0; i < i1; i++) {
            out[i] = xt[i] * p;
        }
        for (int64_t s = 0; s < hc; s++) {
            const float c = AT(comb, s, t)[d];
            const float * r = AT(res, s, t);
            for (int64_t i = i0; i < i1; i++) {
                out[i] += r[i] * c;
            }
        }
    }
}

static void hc_post_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const int64_t D = dst->ne[0], n = dst->ne[2];
    if (n >= nth) { /* prompt processing: tokens across threads */
        for (int64_t t = ith; t < n; t += nth) {
            post_token(dst, t, 0, D);
        }
        return;
    }
    const int64_t chunk = ((D + nth - 1) / nth + 15) / 16 * 16; /* decode: rows across threads */
    const int64_t i0 = ith * chunk, i1 = i0 + chunk < D ? i0 + chunk : D;
    for (int64_t t = 0; t < n && i0 < i1; t++) {
        post_token(dst, t, i0, i1);
    }
}

struct ggml_tensor * dsv4_hc_post_cpu(struct ggml_context * ctx, struct ggml_tensor * x, struct ggml_tensor * residual,
                                      struct ggml_tensor * post, struct ggml_tensor * comb) {
    const int64_t D = residual->ne[0], hc = residual->ne[1], n = residual->ne[2];
    struct ggml_tensor * t[4] = {x, residual, post, comb};
    for (int k = 0; k < 4; k++) {
        if (t[k]->type != GGML_TYPE_F32 || t[k]->nb[0] != sizeof(float) || t[k]->ne[3] != 1) {
            return NULL;
        }
    }
    if (hc < 1 || hc > MAX_HC || x->ne[0] != D || x->ne[1] != n || x->ne[2] != 1 || post->ne[0] != hc ||
        post->ne[1] != n || post->ne[2] != 1 || comb->ne[0] != hc || comb->ne[1] != hc || comb->ne[2] != n) {
        return NULL;
    }
    return ggml_custom_4d(ctx, GGML_TYPE_F32, D, hc, n, 1, t, 4, hc_post_op, GGML_N_TASKS_MAX, NULL);
}

static void hc_gates_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor *mix = dst->src[0], *scale = dst->src[1], *base = dst->src[2];
    const uint32_t bits = (uint32_t) (uintptr_t) userdata; /* eps's bits, carried in the pointer (no lifetime) */
    float eps;
    memcpy(&eps, &bits, sizeof eps);
    const int64_t hc = dst->ne[0], n = dst->ne[1], gates = dst->ne[2];
    const float * sc = (const float *) scale->data;
    const float * b = (const float *) base->data;
    for (int64_t t = ith; t < n; t += nth) {
        const float * m = AT(mix, t, 0);
        for (int64_t k = 0; k < gates; k++) {
            float * out = (float *) ((char *) dst->data + t * dst->nb[1] + k * dst->nb[2]);
            for (int64_t i = 0; i < hc; i++) {
                float v = m[k * hc + i] * sc[k];
                v = v + b[k * hc + i];
                v = 1.f / (1.f + expf(-v));
                out[i] = k == 0 ? v + eps : v * 2.f;
            }
        }
    }
}

struct ggml_tensor * dsv4_hc_gates_cpu(struct ggml_context * ctx, struct ggml_tensor * mix, struct ggml_tensor * scale,
                                       struct ggml_tensor * base, int hc, int n_gates, float eps) {
    struct ggml_tensor * t[3] = {mix, scale, base};
    for (int k = 0; k < 3; k++) {
        if (t[k]->type != GGML_TYPE_F32 || t[k]->nb[0] != sizeof(float) || t[k]->ne[2] != 1 || t[k]->ne[3] != 1) {
            return NULL;
        }
    }
    if (hc < 1 || hc > MAX_HC || n_gates < 1 || n_gates > 2 || mix->ne[0] < n_gates * hc ||
        ggml_nelements(scale) < n_gates || ggml_nelements(base) < n_gates * hc || !ggml_is_contiguous(scale) ||
        !ggml_is_contiguous(base)) {
        return NULL;
    }
    uint32_t bits;
    memcpy(&bits, &eps, sizeof bits);
    return ggml_custom_4d(ctx, GGML_TYPE_F32, hc, mix->ne[1], n_gates, 1, t, 3, hc_gates_op, GGML_N_TASKS_MAX,
                          (void *) (uintptr_t) bits);
}
