# Cython declarations of kernels/dsv4_ops.h (our own DeepSeek V4 ops, composed from ggml ops).
from ggml cimport ggml_backend_buffer_type_t, ggml_context, ggml_tensor

cdef extern from "dsv4_ops.h" nogil:
    struct dsv4_rope_params:
        int n_ctx_orig
        float freq_base
        float freq_scale
        float ext_factor
        float attn_factor
        float beta_fast
        float beta_slow

    ctypedef ggml_tensor * (*dsv4_concat_fn)(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, int dim)
    ggml_tensor * dsv4_swiglu_clamp(ggml_context * ctx, ggml_tensor * gate, ggml_tensor * up, float limit)
    ggml_tensor * dsv4_rope_tail(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, int n_rot,
                                 const dsv4_rope_params * p, dsv4_concat_fn cat)
    ggml_tensor * dsv4_rope_tail_back(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, int n_rot,
                                      const dsv4_rope_params * p, dsv4_concat_fn cat)

cdef extern from "dsv4_concat.h" nogil:
    ggml_tensor * dsv4_concat_cpu(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, int dim)

cdef extern from "dsv4_topk.h" nogil:
    ggml_tensor * dsv4_top_k(ggml_context * ctx, ggml_tensor * a, int k)
    void dsv4_top_k_row(const float * x, int n, int k, int * out)

cdef extern from "dsv4_gemm.h" nogil:
    enum:
        DSV4_GEMM_OFF
        DSV4_GEMM_SCALAR
        DSV4_GEMM_AVX2
        DSV4_GEMM_AVX512
        DSV4_GEMM_VNNI
    int dsv4_gemm_isa_best()
    int dsv4_gemm_isa_supported(int isa)
    int dsv4_moe_gemm_ok(const ggml_tensor * a, const ggml_tensor * b, const ggml_tensor * ids)
    ggml_tensor * dsv4_q8k_prep(ggml_context * ctx, ggml_tensor * b, int isa)
    ggml_tensor * dsv4_mul_mat_id_kq(ggml_context * ctx, ggml_tensor * a, ggml_tensor * prep, ggml_tensor * ids,
                                      int isa)
    int dsv4_dense_kq_ok(const ggml_tensor * w, const ggml_tensor * x)
    ggml_tensor * dsv4_mul_mat_kq(ggml_context * ctx, ggml_tensor * w, ggml_tensor * prep, int isa)
    int dsv4_dense_gemm_ok(const ggml_tensor * w, const ggml_tensor * x)
    ggml_tensor * dsv4_q80_prep(ggml_context * ctx, ggml_tensor * x)
    ggml_tensor * dsv4_mul_mat_q80(ggml_context * ctx, ggml_tensor * w, ggml_tensor * prep)

cdef extern from "dsv4_hc.h" nogil:
    ggml_tensor * dsv4_hc_gates_cpu(ggml_context * ctx, ggml_tensor * mix, ggml_tensor * scale, ggml_tensor * base,
                                    int hc, int n_gates, float eps)
    ggml_tensor * dsv4_hc_post_cpu(ggml_context * ctx, ggml_tensor * x, ggml_tensor * residual, ggml_tensor * post,
                                   ggml_tensor * comb)

cdef extern from "dsv4_threads.h" nogil:
    ggml_tensor * dsv4_thread_ids(ggml_context * ctx, int n)

cdef extern from "dsv4_prefetch.h" nogil:
    struct dsv4_prefetch_stats:
        unsigned long long calls
        unsigned long long slices
        unsigned long long missing_slices
        unsigned long long missing_bytes
    ggml_tensor * dsv4_moe_prefetch(ggml_context * ctx, ggml_tensor * ids, ggml_tensor * gate, ggml_tensor * up,
                                    ggml_tensor * down, dsv4_prefetch_stats * stats)

cdef extern from "dsv4_rpc_buft.h" nogil:
    ggml_backend_buffer_type_t dsv4_rpc_buft_new(ggml_backend_buffer_type_t inner)
    void dsv4_rpc_buft_free(ggml_backend_buffer_type_t buft)
    void dsv4_rpc_buft_stats(ggml_backend_buffer_type_t buft, size_t * hits, size_t * misses)
