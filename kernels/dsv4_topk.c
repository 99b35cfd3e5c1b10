/* See dsv4_topk.h. */
#include "dsv4_topk.h"

#include <stdint.h>
#include <stdlib.h>

/* "a beats b": strictly greater score. The heap keeps its weakest element at the root. */
static inline int beats(const float * x, int a, int b) {
    return x[a] > x[b];
}

/* Sift `value` down from `hole` in heap h[0..n), then up (the standard adjust-heap of a binary heap whose
 * parent "does not beat"... i.e. is weaker than or tied with its children). */
static void adjust(int * h, int hole, int n, int value, const float * x) {
    const int top = hole;
    int child = hole;
    while (child < (n - 1) / 2) {
        child = 2 * (child + 1);
        if (beats(x, h[child], h[child - 1])) {
            child--;
        }
        h[hole] = h[child];
        hole = child;
    }
    if ((n & 1) == 0 && child == (n - 2) / 2) {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    int parent = (hole - 1) / 2;
    while (hole > top && beats(x, h[parent], value)) {
        h[hole] = h[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    h[hole] = value;
}

void dsv4_top_k_row(const float * x, int n, int k, int * h) {
    for (int i = 0; i < k; i++) {
        h[i] = i;
    }
    if (k >= 2) {
        for (int parent = (k - 2) / 2; parent >= 0; parent--) {
            adjust(h, parent, k, h[parent], x);
        }
    }
    for (int i = k; i < n; i++) {
        if (beats(x, i, h[0])) {
            adjust(h, 0, k, i, x);
        }
    }
}

static void top_k_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * a = dst->src[0];
    const int n = (int) a->ne[0];
    const int k = (int) dst->ne[0];
    const int64_t rows = a->ne[1] * a->ne[2] * a->ne[3];
    for (int64_t r = ith; r < rows; r += nth) {
        const int64_t i1 = r % a->ne[1], i2 = (r / a->ne[1]) % a->ne[2], i3 = r / (a->ne[1] * a->ne[2]);
        const float * x = (const float *) ((const char *) a->data + i1 * a->nb[1] + i2 * a->nb[2] + i3 * a->nb[3]);
        int * out = (int *) ((char *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2] + i3 * dst->nb[3]);
        dsv4_top_k_row(x, n, k, out);
    }
}

struct ggml_tensor * dsv4_top_k(struct ggml_context * ctx, struct ggml_tensor * a, int k) {
    if (a->type != GGML_TYPE_F32 || a->nb[0] != sizeof(float) || k < 1 || k > a->ne[0]) {
        return NULL;
    }
    struct ggml_tensor * args[1] = {a};
    return ggml_custom_4d(ctx, GGML_TYPE_I32, k, a->ne[1], a->ne[2], a->ne[3], args, 1, top_k_op, GGML_N_TASKS_MAX,
                          NULL);
}
