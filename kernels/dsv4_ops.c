/* See dsv4_ops.h. Everything here only builds graph nodes from ops every ggml backend implements. */
#include "dsv4_ops.h"

#include <math.h>

struct ggml_tensor * dsv4_swiglu_clamp(struct ggml_context * ctx, struct ggml_tensor * gate,
                                       struct ggml_tensor * up, float limit) {
    if (limit > 1e-6f) {
        gate = ggml_clamp(ctx, gate, -INFINITY, limit);
        up = ggml_clamp(ctx, up, -limit, limit);
    }
    return ggml_swiglu_split(ctx, gate, up);
}

static struct ggml_tensor * rope_tail(struct ggml_context * ctx, struct ggml_tensor * x,
                                      struct ggml_tensor * pos, int n_rot,
                                      const struct dsv4_rope_params * p, int inverse, dsv4_concat_fn cat) {
    const int64_t d = x->ne[0];
    if (n_rot <= 0 || (n_rot & 1) || n_rot > d || x->ne[3] != 1 || x->type != GGML_TYPE_F32 ||
        pos->type != GGML_TYPE_I32 || pos->ne[0] != x->ne[2]) {
        return NULL;
    }
    const size_t es = ggml_element_size(x);
    struct ggml_tensor * tail = d == n_rot
        ? x
        : ggml_view_3d(ctx, x, n_rot, x->ne[1], x->ne[2], x->nb[1], x->nb[2], (size_t)(d - n_rot) * es);
    struct ggml_tensor * (*rope)(struct ggml_context *, struct ggml_tensor *, struct ggml_tensor *,
                                 struct ggml_tensor *, int, int, int, float, float, float, float,
                                 float, float) = inverse ? ggml_rope_ext_back : ggml_rope_ext;
    struct ggml_tensor * rot = rope(ctx, tail, pos, NULL, n_rot, GGML_ROPE_TYPE_NORMAL, p->n_ctx_orig,
                                    p->freq_base, p->freq_scale, p->ext_factor, p->attn_factor,
                                    p->beta_fast, p->beta_slow);
    if (d == n_rot) {
        return rot;
    }
    struct ggml_tensor * head = ggml_view_3d(ctx, x, d - n_rot, x->ne[1], x->ne[2], x->nb[1], x->nb[2], 0);
    struct ggml_tensor * out = cat != NULL ? cat(ctx, head, rot, 0) : NULL;
    return out != NULL ? out : ggml_concat(ctx, head, rot, 0);
}

struct ggml_tensor * dsv4_rope_tail(struct ggml_context * ctx, struct ggml_tensor * x,
                                    struct ggml_tensor * pos, int n_rot,
                                    const struct dsv4_rope_params * p, dsv4_concat_fn cat) {
    return rope_tail(ctx, x, pos, n_rot, p, 0, cat);
}

struct ggml_tensor * dsv4_rope_tail_back(struct ggml_context * ctx, struct ggml_tensor * x,
                                         struct ggml_tensor * pos, int n_rot,
                                         const struct dsv4_rope_params * p, dsv4_concat_fn cat) {
    return rope_tail(ctx, x, pos, n_rot, p, 1, cat);
}
