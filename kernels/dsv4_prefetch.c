/* See dsv4_prefetch.h. */
#if defined(__linux__)
#define _DEFAULT_SOURCE
#endif
#include "dsv4_prefetch.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__linux__) || defined(__APPLE__)
#define DSV4_HAVE_MINCORE 1
#include <sys/mman.h>
#include <unistd.h>
#else
#define DSV4_HAVE_MINCORE 0
#endif

#define N_TENSORS 3
#define CHUNK_PAGES 4096 /* mincore's vector on the stack: 4 KiB, spans of up to 16 MiB (4 KiB pages) at a time */

#if DSV4_HAVE_MINCORE
#if defined(__APPLE__)
typedef char mincore_vec_t;
#else
typedef unsigned char mincore_vec_t;
#endif

static void count(uint64_t * field, uint64_t n) {
    __atomic_fetch_add(field, n, __ATOMIC_RELAXED);
}

/* Check the pages of [base, base + len) and advise the span of the missing ones; returns the bytes advised. */
static uint64_t prefetch_range(uintptr_t base, size_t len, uintptr_t page) {
    uintptr_t start = base & ~(page - 1);
    const uintptr_t end = (base + len + page - 1) & ~(page - 1);
    uint64_t advised = 0;
    mincore_vec_t vec[CHUNK_PAGES];
    while (start < end) {
        const size_t pages = (end - start) / page < CHUNK_PAGES ? (size_t) ((end - start) / page) : CHUNK_PAGES;
        if (mincore((void *) start, pages * page, vec) == 0) {
            size_t first = pages, last = 0;
            for (size_t i = 0; i < pages; i++) {
                if (!(vec[i] & 1)) {
                    if (first == pages) {
                        first = i;
                    }
                    last = i;
                }
            }
            if (first < pages && madvise((void *) (start + first * page), (last - first + 1) * page,
                                         MADV_WILLNEED) == 0) {
                advised += (uint64_t) (last - first + 1) * page;
            }
        }
        start += pages * page;
    }
    return advised;
}
#endif

static void prefetch_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#if DSV4_HAVE_MINCORE
    struct dsv4_prefetch_stats * stats = (struct dsv4_prefetch_stats *) userdata;
    const struct ggml_tensor * ids = dst->src[0];
    const struct ggml_tensor * w[N_TENSORS] = {dst->src[1], dst->src[2], dst->src[3]};
    const int64_t n_expert = w[0]->ne[2];
    /* the distinct experts, in first-seen order (every thread computes the same list; ids are few) */
    uint64_t seen[DSV4_PREFETCH_MAX_EXPERTS / 64] = {0};
    int32_t list[DSV4_PREFETCH_MAX_EXPERTS];
    int64_t n = 0;
    for (int64_t i1 = 0; i1 < ids->ne[1]; i1++) {  /* ids is 2-D (dsv4_moe_prefetch checks it) */
        for (int64_t i0 = 0; i0 < ids->ne[0]; i0++) {
            const int32_t e = *(const int32_t *) ((const char *) ids->data + i0 * ids->nb[0] + i1 * ids->nb[1]);
            if (e < 0 || e >= n_expert || (seen[e / 64] >> (e % 64)) & 1) {
                continue;
            }
            seen[e / 64] |= (uint64_t) 1 << (e % 64);
            list[n++] = e;
        }
    }
    const long page_size = sysconf(_SC_PAGESIZE);
    const uintptr_t page = page_size > 0 ? (uintptr_t) page_size : 4096;
    uint64_t slices = 0, missing = 0, bytes = 0;
    for (int64_t u = ith; u < n * N_TENSORS; u += nth) {  /* (expert, tensor) slices spread over the threads */
        const struct ggml_tensor * t = w[u % N_TENSORS];
        const uint64_t b = prefetch_range((uintptr_t) t->data + (uintptr_t) list[u / N_TENSORS] * t->nb[2], t->nb[2],
                                          page);
        slices++;
        missing += b > 0;
        bytes += b;
    }
    if (stats != NULL) {
        if (ith == 0) {
            count(&stats->calls, 1);
        }
        count(&stats->slices, slices);
        count(&stats->missing_slices, missing);
        count(&stats->missing_bytes, bytes);
    }
#else
    (void) userdata;
    (void) ith;
    (void) nth;
#endif
    if (ith == 0) {
        *(int32_t *) dst->data = 0;
    }
}

struct ggml_tensor * dsv4_moe_prefetch(struct ggml_context * ctx, struct ggml_tensor * ids, struct ggml_tensor * gate,
                                       struct ggml_tensor * up, struct ggml_tensor * down,
                                       struct dsv4_prefetch_stats * stats) {
    struct ggml_tensor * w[N_TENSORS] = {gate, up, down};
    if (ids == NULL || ids->type != GGML_TYPE_I32 || ids->ne[2] != 1 || ids->ne[3] != 1) {
        return NULL;
    }
    for (int i = 0; i < N_TENSORS; i++) {
        if (w[i] == NULL || w[i]->ne[2] != gate->ne[2] || w[i]->ne[3] != 1 || w[i]->ne[2] < 1 ||
            w[i]->ne[2] > DSV4_PREFETCH_MAX_EXPERTS) {
            return NULL;
        }
    }
    struct ggml_tensor * args[1 + N_TENSORS] = {ids, gate, up, down};
    return ggml_custom_4d(ctx, GGML_TYPE_I32, 1, 1, 1, 1, args, 1 + N_TENSORS, prefetch_op, GGML_N_TASKS_MAX,
                          (void *) stats);
}
