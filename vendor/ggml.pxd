# Our Cython declarations of the parts of the ggml C API (libggml-python==0.20.2.post1, ggml 0.20.2)
# that llama_dsv4 uses. Only declarations: the library itself comes from the pinned PyPI package.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stddef cimport size_t

cdef extern from "<stdbool.h>":
    # C's bool, for the function-pointer types ggml declares with it (a Cython bint is an int: the pointer types
    # would not match, an error from GCC 14 on)
    ctypedef bint c_bool "bool"

cdef extern from "ggml.h" nogil:
    enum: GGML_MAX_DIMS
    enum: GGML_MAX_NAME
    enum: GGML_ROPE_TYPE_NORMAL
    enum: GGML_ROPE_TYPE_NEOX

    cdef enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_Q8_1
        GGML_TYPE_Q2_K
        GGML_TYPE_Q3_K
        GGML_TYPE_Q4_K
        GGML_TYPE_Q5_K
        GGML_TYPE_Q6_K
        GGML_TYPE_Q8_K
        GGML_TYPE_I8
        GGML_TYPE_I16
        GGML_TYPE_I32
        GGML_TYPE_I64
        GGML_TYPE_F64
        GGML_TYPE_BF16
        GGML_TYPE_MXFP4
        GGML_TYPE_COUNT

    cdef enum ggml_prec:
        GGML_PREC_DEFAULT
        GGML_PREC_F32

    cdef enum ggml_sort_order:
        GGML_SORT_ORDER_ASC
        GGML_SORT_ORDER_DESC

    cdef enum ggml_status:
        GGML_STATUS_ALLOC_FAILED
        GGML_STATUS_FAILED
        GGML_STATUS_SUCCESS
        GGML_STATUS_ABORTED

    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    struct ggml_context:
        pass

    struct ggml_cgraph:
        pass

    struct ggml_backend_buffer:
        pass

    struct ggml_tensor:
        ggml_type type
        ggml_backend_buffer * buffer
        int64_t ne[4]
        size_t nb[4]
        void * data
        char name[64]

    struct ggml_init_params:
        size_t mem_size
        void * mem_buffer
        bint no_alloc

    ctypedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k)
    ctypedef void (*ggml_from_float_t)(const float * x, void * y, int64_t k)

    struct ggml_type_traits:
        const char * type_name
        int64_t blck_size
        int64_t blck_size_interleave
        size_t type_size
        bint is_quantized
        ggml_to_float_t to_float
        ggml_from_float_t from_float_ref

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data)
    void ggml_log_set(ggml_log_callback log_callback, void * user_data)

    const ggml_type_traits * ggml_get_type_traits(ggml_type type)
    int64_t ggml_blck_size(ggml_type type)
    size_t ggml_type_size(ggml_type type)
    size_t ggml_row_size(ggml_type type, int64_t ne)
    const char * ggml_type_name(ggml_type type)
    bint ggml_is_quantized(ggml_type type)

    size_t ggml_quantize_chunk(ggml_type type, const float * src, void * dst, int64_t start,
                               int64_t nrows, int64_t n_per_row, const float * imatrix)
    bint ggml_quantize_requires_imatrix(ggml_type type)

    size_t ggml_element_size(const ggml_tensor * tensor)
    size_t ggml_tensor_overhead()
    size_t ggml_graph_overhead_custom(size_t size, bint grads)
    ggml_context * ggml_init(ggml_init_params params)
    void ggml_free(ggml_context * ctx)

    int64_t ggml_nelements(const ggml_tensor * tensor)
    size_t ggml_nbytes(const ggml_tensor * tensor)
    bint ggml_is_contiguous(const ggml_tensor * tensor)

    ggml_tensor * ggml_new_tensor(ggml_context * ctx, ggml_type type, int n_dims, const int64_t * ne)
    ggml_tensor * ggml_new_tensor_1d(ggml_context * ctx, ggml_type type, int64_t ne0)
    ggml_tensor * ggml_new_tensor_2d(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1)
    ggml_tensor * ggml_new_tensor_3d(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2)
    ggml_tensor * ggml_new_tensor_4d(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1,
                                     int64_t ne2, int64_t ne3)
    ggml_tensor * ggml_get_tensor(ggml_context * ctx, const char * name)
    ggml_tensor * ggml_set_name(ggml_tensor * tensor, const char * name)
    ggml_tensor * ggml_format_name(ggml_tensor * tensor, const char * fmt, ...)
    void ggml_set_input(ggml_tensor * tensor)
    void ggml_set_output(ggml_tensor * tensor)

    # graph
    ggml_cgraph * ggml_new_graph_custom(ggml_context * ctx, size_t size, bint grads)
    void ggml_build_forward_expand(ggml_cgraph * cgraph, ggml_tensor * tensor)
    int ggml_graph_n_nodes(ggml_cgraph * cgraph)
    ggml_tensor * ggml_graph_node(ggml_cgraph * cgraph, int i)
    const char * ggml_op_desc(const ggml_tensor * t)
    size_t ggml_used_mem(const ggml_context * ctx)
    void ggml_time_init()
    int64_t ggml_time_us()

    # ops used by the graph builders and kernels/
    ggml_tensor * ggml_add(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_sub(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_mul(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_div(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_scale(ggml_context * ctx, ggml_tensor * a, float s)
    ggml_tensor * ggml_scale_bias(ggml_context * ctx, ggml_tensor * a, float s, float b)
    ggml_tensor * ggml_fill(ggml_context * ctx, ggml_tensor * a, float c)
    ggml_tensor * ggml_cast(ggml_context * ctx, ggml_tensor * a, ggml_type type)
    ggml_tensor * ggml_soft_max(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_argsort_top_k(ggml_context * ctx, ggml_tensor * a, int k)
    ggml_tensor * ggml_reshape_4d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                                  int64_t ne3)
    ggml_tensor * ggml_cont_2d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1)
    ggml_tensor * ggml_sqrt(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_softplus(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_sigmoid(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_silu(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_relu(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_clamp(ggml_context * ctx, ggml_tensor * a, float min, float max)
    ggml_tensor * ggml_swiglu_split(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_sum_rows(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_repeat(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_repeat_4d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                                 int64_t ne3)
    ggml_tensor * ggml_concat(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, int dim)
    ggml_tensor * ggml_rms_norm(ggml_context * ctx, ggml_tensor * a, float eps)
    ggml_tensor * ggml_mul_mat(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    void ggml_mul_mat_set_prec(ggml_tensor * a, ggml_prec prec)
    ggml_tensor * ggml_mul_mat_id(ggml_context * ctx, ggml_tensor * as_, ggml_tensor * b, ggml_tensor * ids)
    ggml_tensor * ggml_cpy(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_cont(ggml_context * ctx, ggml_tensor * a)
    ggml_tensor * ggml_reshape_1d(ggml_context * ctx, ggml_tensor * a, int64_t ne0)
    ggml_tensor * ggml_reshape_2d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1)
    ggml_tensor * ggml_reshape_3d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2)
    ggml_tensor * ggml_view_1d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, size_t offset)
    ggml_tensor * ggml_view_2d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1,
                               size_t nb1, size_t offset)
    ggml_tensor * ggml_view_3d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                               size_t nb1, size_t nb2, size_t offset)
    ggml_tensor * ggml_view_4d(ggml_context * ctx, ggml_tensor * a, int64_t ne0, int64_t ne1, int64_t ne2,
                               int64_t ne3, size_t nb1, size_t nb2, size_t nb3, size_t offset)
    ggml_tensor * ggml_permute(ggml_context * ctx, ggml_tensor * a, int axis0, int axis1, int axis2, int axis3)
    ggml_tensor * ggml_get_rows(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b)
    ggml_tensor * ggml_set_rows(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, ggml_tensor * c)
    ggml_tensor * ggml_soft_max_ext(ggml_context * ctx, ggml_tensor * a, ggml_tensor * mask,
                                    float scale, float max_bias)
    void ggml_soft_max_add_sinks(ggml_tensor * a, ggml_tensor * sinks)
    ggml_tensor * ggml_rope_ext(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, ggml_tensor * c,
                                int n_dims, int mode, int n_ctx_orig, float freq_base, float freq_scale,
                                float ext_factor, float attn_factor, float beta_fast, float beta_slow)
    ggml_tensor * ggml_rope_ext_back(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, ggml_tensor * c,
                                     int n_dims, int mode, int n_ctx_orig, float freq_base, float freq_scale,
                                     float ext_factor, float attn_factor, float beta_fast, float beta_slow)
    ggml_tensor * ggml_argsort(ggml_context * ctx, ggml_tensor * a, ggml_sort_order order)
    ggml_tensor * ggml_top_k(ggml_context * ctx, ggml_tensor * a, int k)
    ggml_tensor * ggml_flash_attn_ext(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                      ggml_tensor * mask, float scale, float max_bias, float logit_softcap)
    void ggml_flash_attn_ext_set_prec(ggml_tensor * a, ggml_prec prec)
    void ggml_flash_attn_ext_add_sinks(ggml_tensor * a, ggml_tensor * sinks)
    ggml_tensor * ggml_lightning_indexer(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k,
                                         ggml_tensor * weights, ggml_tensor * mask)
    ggml_tensor * ggml_dsv4_hc_comb(ggml_context * ctx, ggml_tensor * mixes, ggml_tensor * scale,
                                    ggml_tensor * base, float eps, int32_t n_iter)
    ggml_tensor * ggml_dsv4_hc_pre(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weights)
    ggml_tensor * ggml_dsv4_hc_post(ggml_context * ctx, ggml_tensor * x, ggml_tensor * residual,
                                    ggml_tensor * post, ggml_tensor * comb)


cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend:
        pass
    ctypedef ggml_backend * ggml_backend_t
    ctypedef ggml_backend_buffer * ggml_backend_buffer_t
    ctypedef struct ggml_backend_buffer_type:
        pass
    ctypedef ggml_backend_buffer_type * ggml_backend_buffer_type_t
    ctypedef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    ctypedef struct ggml_backend_sched:
        pass
    ctypedef ggml_backend_sched * ggml_backend_sched_t

    cdef enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL

    cdef enum ggml_backend_buffer_usage:
        GGML_BACKEND_BUFFER_USAGE_ANY
        GGML_BACKEND_BUFFER_USAGE_WEIGHTS
        GGML_BACKEND_BUFFER_USAGE_COMPUTE

    struct ggml_backend_dev_caps:
        bint async "async"
        bint host_buffer
        bint buffer_from_host_ptr
        bint events
        bint mmap_support

    struct ggml_backend_dev_props:
        const char * name
        const char * description
        size_t memory_free
        size_t memory_total
        ggml_backend_dev_type type
        const char * device_id
        ggml_backend_dev_caps caps

    # buffers
    const char * ggml_backend_buft_name(ggml_backend_buffer_type_t buft)
    ggml_backend_buffer_t ggml_backend_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size)
    bint ggml_backend_buft_is_host(ggml_backend_buffer_type_t buft)
    void ggml_backend_buffer_free(ggml_backend_buffer_t buffer)
    void * ggml_backend_buffer_get_base(ggml_backend_buffer_t buffer)
    size_t ggml_backend_buffer_get_size(ggml_backend_buffer_t buffer)
    bint ggml_backend_buffer_is_host(ggml_backend_buffer_t buffer)
    void ggml_backend_buffer_set_usage(ggml_backend_buffer_t buffer, ggml_backend_buffer_usage usage)
    void ggml_backend_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value)
    ggml_status ggml_backend_tensor_alloc(ggml_backend_buffer_t buffer, ggml_tensor * tensor, void * addr)

    # backends
    const char * ggml_backend_name(ggml_backend_t backend)
    void ggml_backend_free(ggml_backend_t backend)
    ggml_status ggml_backend_graph_compute(ggml_backend_t backend, ggml_cgraph * cgraph)
    ggml_backend_dev_t ggml_backend_get_device(ggml_backend_t backend)
    ggml_backend_buffer_type_t ggml_backend_get_default_buffer_type(ggml_backend_t backend)
    void ggml_backend_tensor_set(ggml_tensor * tensor, const void * data, size_t offset, size_t size)
    void ggml_backend_tensor_get(const ggml_tensor * tensor, void * data, size_t offset, size_t size)
    bint ggml_backend_supports_op(ggml_backend_t backend, const ggml_tensor * op)

    # devices and registry
    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_type ggml_backend_dev_kind "ggml_backend_dev_type"(ggml_backend_dev_t device)
    void ggml_backend_dev_get_props(ggml_backend_dev_t device, ggml_backend_dev_props * props)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)
    ggml_backend_t ggml_backend_dev_init(ggml_backend_dev_t device, const char * params)
    ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device)
    ggml_backend_buffer_t ggml_backend_dev_buffer_from_host_ptr(ggml_backend_dev_t device, void * ptr,
                                                                size_t size, size_t max_tensor_size)
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name)
    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    ggml_backend_reg_t ggml_backend_reg_by_name(const char * name)
    size_t ggml_backend_reg_count()
    ggml_backend_reg_t ggml_backend_reg_get(size_t index)
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)

    # scheduler
    ggml_backend_sched_t ggml_backend_sched_new(ggml_backend_t * backends, ggml_backend_buffer_type_t * bufts,
                                                int n_backends, size_t graph_size, bint parallel,
                                                bint op_offload)
    void ggml_backend_sched_free(ggml_backend_sched_t sched)
    bint ggml_backend_sched_reserve(ggml_backend_sched_t sched, ggml_cgraph * measure_graph)
    bint ggml_backend_sched_alloc_graph(ggml_backend_sched_t sched, ggml_cgraph * graph)
    ggml_status ggml_backend_sched_graph_compute(ggml_backend_sched_t sched, ggml_cgraph * graph)
    void ggml_backend_sched_reset(ggml_backend_sched_t sched)
    ctypedef c_bool (*ggml_backend_sched_eval_callback)(ggml_tensor * t, c_bool ask, void * user_data)
    void ggml_backend_sched_set_eval_callback(ggml_backend_sched_t sched, ggml_backend_sched_eval_callback callback,
                                              void * user_data)
    size_t ggml_backend_sched_get_buffer_size(ggml_backend_sched_t sched, ggml_backend_t backend)
    int ggml_backend_sched_get_n_splits(ggml_backend_sched_t sched)
    int ggml_backend_sched_get_n_copies(ggml_backend_sched_t sched)
    ggml_backend_t ggml_backend_sched_get_tensor_backend(ggml_backend_sched_t sched, ggml_tensor * node)


cdef extern from "ggml-alloc.h" nogil:
    ggml_backend_buffer_t ggml_backend_alloc_ctx_tensors_from_buft(ggml_context * ctx,
                                                                    ggml_backend_buffer_type_t buft)


# the entry point registered by every backend that has a thread count (CPU, BLAS, ...)
ctypedef void (*ggml_backend_set_n_threads_t)(ggml_backend_t backend, int n_threads)


cdef extern from "ggml.h" nogil:
    struct ggml_threadpool
    ctypedef ggml_threadpool * ggml_threadpool_t
    struct ggml_threadpool_params:
        int n_threads
        uint32_t poll
    ggml_threadpool_params ggml_threadpool_params_default(int n_threads)


cdef extern from "ggml-cpu.h" nogil:
    ggml_threadpool * ggml_threadpool_new(ggml_threadpool_params * params)
    void ggml_threadpool_free(ggml_threadpool * threadpool)
    void ggml_backend_cpu_set_threadpool(ggml_backend_t backend_cpu, ggml_threadpool_t threadpool)
