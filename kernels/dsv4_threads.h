/* Which kernel thread runs each task of a CPU compute, as a CPU custom op: element ith of the I32 result is the
 * thread id (Linux gettid) of the thread that ran task ith, -1 where the system has no such id. ggml's thread
 * pool keeps each thread's task index for the pool's lifetime, so one compute with every thread of the pool maps
 * the pool's indices to threads (engine/governor.py reads their scheduler statistics). Returns NULL for n < 1. */
#ifndef LLAMA_DSV4_THREADS_H
#define LLAMA_DSV4_THREADS_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor * dsv4_thread_ids(struct ggml_context * ctx, int n);

#ifdef __cplusplus
}
#endif

#endif
