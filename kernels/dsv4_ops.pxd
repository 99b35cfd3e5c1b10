# Cython declarations of kernels/dsv4_ops.h (our own DeepSeek V4 ops, composed from ggml ops).
from ggml cimport ggml_context, ggml_tensor

cdef extern from "dsv4_ops.h" nogil:
    struct dsv4_rope_params:
        int n_ctx_orig
        float freq_base
        float freq_scale
        float ext_factor
        float attn_factor
        float beta_fast
        float beta_slow

    ggml_tensor * dsv4_swiglu_clamp(ggml_context * ctx, ggml_tensor * gate, ggml_tensor * up, float limit)
    ggml_tensor * dsv4_rope_tail(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, int n_rot,
                                 const dsv4_rope_params * p)
    ggml_tensor * dsv4_rope_tail_back(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, int n_rot,
                                      const dsv4_rope_params * p)

cdef extern from "dsv4_topk.h" nogil:
    ggml_tensor * dsv4_top_k(ggml_context * ctx, ggml_tensor * a, int k)
    void dsv4_top_k_row(const float * x, int n, int k, int * out)
