/* The caching view of an RPC buffer type: dsv4_rpc_buft.h. */
#include "dsv4_rpc_buft.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ggml 0.20.2's struct ggml_backend_buffer_type (ggml-backend-impl.h): its interface, device and context. */
struct buft_iface {
    const char * (*get_name)(ggml_backend_buffer_type_t buft);
    ggml_backend_buffer_t (*alloc_buffer)(ggml_backend_buffer_type_t buft, size_t size);
    size_t (*get_alignment)(ggml_backend_buffer_type_t buft);
    size_t (*get_max_size)(ggml_backend_buffer_type_t buft);
    size_t (*get_alloc_size)(ggml_backend_buffer_type_t buft, const struct ggml_tensor * tensor);
    bool (*is_host)(ggml_backend_buffer_type_t buft);
};

struct buft_layout {
    struct buft_iface iface;
    ggml_backend_dev_t device;
    void * context;
};

/* What the server's answer depends on: the tensor as the request serialises it, less addresses and names. */
struct shape {
    int32_t type;
    int32_t has_view;
    int64_t ne[GGML_MAX_DIMS];
    size_t nb[GGML_MAX_DIMS];
};

struct key {
    int32_t op;
    int32_t op_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    struct shape self;
    struct shape src[GGML_MAX_SRC];
};

enum { CACHE_SLOTS = 1024 }; /* a power of two; when full, the cache starts again empty */

struct entry {
    int used;
    size_t size;
    struct key key;
};

struct view {
    struct buft_layout base; /* first: the view is a buffer type to ggml */
    size_t (*inner_alloc_size)(ggml_backend_buffer_type_t buft, const struct ggml_tensor * tensor);
    size_t n_used, hits, misses;
    struct entry slots[CACHE_SLOTS];
};

static void shape_of(struct shape * s, const struct ggml_tensor * t) {
    if (t == NULL) {
        s->type = -1;
        return;
    }
    s->type = (int32_t) t->type;
    s->has_view = t->view_src != NULL;
    for (int d = 0; d < GGML_MAX_DIMS; d++) {
        s->ne[d] = t->ne[d];
        s->nb[d] = t->nb[d];
    }
}

static uint64_t fnv1a(const void * p, size_t n) {
    const unsigned char * b = (const unsigned char *) p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ b[i]) * 1099511628211ull;
    }
    return h;
}

static size_t cached_alloc_size(ggml_backend_buffer_type_t buft, const struct ggml_tensor * t) {
    struct view * v = (struct view *) buft;
    struct key k;
    memset(&k, 0, sizeof(k)); /* padding included: the key is compared and hashed as bytes */
    k.op = (int32_t) t->op;
    memcpy(k.op_params, t->op_params, sizeof(k.op_params));
    shape_of(&k.self, t);
    for (int i = 0; i < GGML_MAX_SRC; i++) {
        shape_of(&k.src[i], t->src[i]);
    }
    size_t at = (size_t) fnv1a(&k, sizeof(k)) & (CACHE_SLOTS - 1);
    for (size_t probe = 0; probe < CACHE_SLOTS; probe++) {
        struct entry * e = &v->slots[(at + probe) & (CACHE_SLOTS - 1)];
        if (!e->used) {
            break;
        }
        if (memcmp(&e->key, &k, sizeof(k)) == 0) {
            v->hits++;
            return e->size;
        }
    }
    size_t size = v->inner_alloc_size(buft, t);
    v->misses++;
    if (v->n_used >= CACHE_SLOTS / 2) { /* keep probes short: start again */
        memset(v->slots, 0, sizeof(v->slots));
        v->n_used = 0;
    }
    for (size_t probe = 0; probe < CACHE_SLOTS; probe++) {
        struct entry * e = &v->slots[(at + probe) & (CACHE_SLOTS - 1)];
        if (!e->used) {
            e->used = 1;
            e->size = size;
            e->key = k;
            v->n_used++;
            break;
        }
    }
    return size;
}

ggml_backend_buffer_type_t dsv4_rpc_buft_new(ggml_backend_buffer_type_t inner) {
    if (inner == NULL) {
        return NULL;
    }
    const struct buft_layout * b = (const struct buft_layout *) inner;
    /* the layout check: the device field where ggml's accessor finds it, the functions where they answer as the
     * public calls do */
    if (b->device != ggml_backend_buft_get_device(inner) || b->iface.get_name == NULL ||
        b->iface.alloc_buffer == NULL || b->iface.get_alloc_size == NULL ||
        strcmp(b->iface.get_name(inner), ggml_backend_buft_name(inner)) != 0) {
        return NULL;
    }
    struct view * v = (struct view *) calloc(1, sizeof(struct view));
    if (v == NULL) {
        return NULL;
    }
    v->base = *b; /* the same functions and context: to ggml and to the RPC device, the view is its buffer type */
    v->inner_alloc_size = b->iface.get_alloc_size;
    v->base.iface.get_alloc_size = cached_alloc_size;
    return (ggml_backend_buffer_type_t) v;
}

void dsv4_rpc_buft_free(ggml_backend_buffer_type_t buft) {
    free(buft);
}

void dsv4_rpc_buft_stats(ggml_backend_buffer_type_t buft, size_t * hits, size_t * misses) {
    const struct view * v = (const struct view *) buft;
    *hits = v->hits;
    *misses = v->misses;
}
