/* See dsv4_concat.h. */
#include "dsv4_concat.h"

#include <stdint.h>
#include <string.h>

static const char * row(const struct ggml_tensor * t, int64_t i1, int64_t i2, int64_t i3) {
    return (const char *) t->data + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
}

static void concat_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor *a = dst->src[0], *b = dst->src[1];
    const int dim = (int) (intptr_t) userdata;
    const size_t es = ggml_element_size(dst);
    const int64_t ne1 = dst->ne[1], ne2 = dst->ne[2], rows = ne1 * ne2 * dst->ne[3];
    const int64_t per = (rows + nth - 1) / nth, r0 = ith * per, r1 = r0 + per < rows ? r0 + per : rows;
    for (int64_t r = r0; r < r1; r++) {
        int64_t i[4] = {0, r % ne1, (r / ne1) % ne2, r / (ne1 * ne2)};
        char * out = (char *) dst->data + i[1] * dst->nb[1] + i[2] * dst->nb[2] + i[3] * dst->nb[3];
        if (dim == 0) { /* [a's row | b's row] */
            memcpy(out, row(a, i[1], i[2], i[3]), (size_t) a->ne[0] * es);
            memcpy(out + a->ne[0] * es, row(b, i[1], i[2], i[3]), (size_t) b->ne[0] * es);
        } else if (i[dim] < a->ne[dim]) {
            memcpy(out, row(a, i[1], i[2], i[3]), (size_t) dst->ne[0] * es);
        } else {
            i[dim] -= a->ne[dim];
            memcpy(out, row(b, i[1], i[2], i[3]), (size_t) dst->ne[0] * es);
        }
    }
}

struct ggml_tensor * dsv4_concat_cpu(struct ggml_context * ctx, struct ggml_tensor * a, struct ggml_tensor * b,
                                     int dim) {
    if (dim < 0 || dim > 3 || a->type != b->type || ggml_is_quantized(a->type) ||
        a->nb[0] != ggml_element_size(a) || b->nb[0] != ggml_element_size(b)) {
        return NULL;
    }
    int64_t ne[4];
    for (int k = 0; k < 4; k++) {
        if (k != dim && a->ne[k] != b->ne[k]) {
            return NULL;
        }
        ne[k] = k == dim ? a->ne[k] + b->ne[k] : a->ne[k];
    }
    struct ggml_tensor * args[2] = {a, b};
    return ggml_custom_4d(ctx, a->type, ne[0], ne[1], ne[2], ne[3], args, 2, concat_op, GGML_N_TASKS_MAX,
                          (void *) (intptr_t) dim);
}
