/* Routing-aware prefetch of MoE expert weights (docs/moe-residency.md, "Prefetch").
 *
 * dsv4_moe_prefetch(ctx, ids, gate, up, down, stats) is a CPU custom op that, when it runs, asks the kernel to read
 * the pages of the experts `ids` names (I32 [k, n], any strides: each distinct id once) in the three expert
 * tensors [.., .., n_expert] of one layer, when they are not in memory: for each expert's slice it checks with
 * mincore which pages are missing and issues one madvise(MADV_WILLNEED) over the span from the first missing page
 * to the last. The reads proceed in the background while the graph goes on; the products that need the pages then
 * wait only for what has not arrived. It reads no tensor data but the ids and writes a dummy I32 [1]; it never
 * changes a result. Ids outside [0, n_expert) are skipped. The counters in `stats` (may be NULL) grow atomically.
 * Returns NULL where the op does not apply (ids not 2-D I32, tensors not 3-D with the same expert count, more than
 * DSV4_PREFETCH_MAX_EXPERTS experts): the caller then builds no prefetch. A no-op on systems without mincore. */
#ifndef LLAMA_DSV4_PREFETCH_H
#define LLAMA_DSV4_PREFETCH_H

#include <stdint.h>

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSV4_PREFETCH_MAX_EXPERTS 4096

struct dsv4_prefetch_stats {
    uint64_t calls;          /* op runs (layers x ubatches) */
    uint64_t slices;         /* expert slices checked */
    uint64_t missing_slices; /* ... of which some pages were not in memory (a madvise was issued) */
    uint64_t missing_bytes;  /* bytes of the spans advised (first missing page to last, page-aligned) */
};

struct ggml_tensor * dsv4_moe_prefetch(struct ggml_context * ctx, struct ggml_tensor * ids, struct ggml_tensor * gate,
                                       struct ggml_tensor * up, struct ggml_tensor * down,
                                       struct dsv4_prefetch_stats * stats);

#ifdef __cplusplus
}
#endif

#endif
