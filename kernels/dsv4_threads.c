/* See dsv4_threads.h. */
#ifdef __linux__
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "dsv4_threads.h"

#include <stdint.h>

static void thread_id_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) nth;
    (void) userdata;
    if (ith < 0 || ith >= dst->ne[0]) {
        return;
    }
#ifdef __linux__
    ((int32_t *) dst->data)[ith] = (int32_t) syscall(SYS_gettid);
#else
    ((int32_t *) dst->data)[ith] = -1;
#endif
}

struct ggml_tensor * dsv4_thread_ids(struct ggml_context * ctx, int n) {
    if (n < 1) {
        return NULL;
    }
    return ggml_custom_4d(ctx, GGML_TYPE_I32, n, 1, 1, 1, NULL, 0, thread_id_op, GGML_N_TASKS_MAX, NULL);
}
