/* A buffer type that answers "how many bytes does this tensor need" from a cache, in front of an RPC device's.
 *
 * ggml 0.20.2's RPC buffer type asks its server for the allocation size of every flash-attention and
 * mul_mat_id node (and of quantized tensors whose rows are not a multiple of 512) each time the scheduler plans a
 * graph: a network round trip per such node, several times per graph (tens to hundreds per decoded token; over a
 * link with 1 ms round trips that is most of each token's time). The answer depends only on the tensor's op, type,
 * shape, strides and op parameters and on its sources' (what the request carries), so this view keeps the
 * answers, keyed by exactly that, and asks the server only for a tensor it has not seen. Everything else is the
 * RPC buffer type's own behaviour: the view shares its functions and context, so buffers it allocates are the RPC
 * device's.
 *
 * The view needs ggml 0.20.2's internal layout of a buffer type (ggml-backend-impl.h, which the wheel does not
 * install); dsv4_rpc_buft_new checks that layout against ggml's public accessors and returns NULL where it does not
 * match (callers then use the plain buffer type). Not thread-safe: one scheduler at a time uses a view. */
#ifndef LLAMA_DSV4_RPC_BUFT_H
#define LLAMA_DSV4_RPC_BUFT_H

#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A caching view of `inner`, or NULL (layout not recognised, or no memory). Free it with dsv4_rpc_buft_free
 * after every scheduler and buffer that uses it. */
ggml_backend_buffer_type_t dsv4_rpc_buft_new(ggml_backend_buffer_type_t inner);
void dsv4_rpc_buft_free(ggml_backend_buffer_type_t buft);

/* Sizes answered from the cache, and asked of the inner buffer type (the server), since the view was made. */
void dsv4_rpc_buft_stats(ggml_backend_buffer_type_t buft, size_t * hits, size_t * misses);

#ifdef __cplusplus
}
#endif

#endif
