# The deepseek4 graph: the C-level structs the builder reads (filled once by the context from DSV4Params and the
# mapped weights) and the builder itself. No Python objects cross this boundary.
cimport ggml as g
from dsv4_ops cimport dsv4_rope_params


cdef struct Hparams:
    int n_embd
    int n_layer
    int n_head
    int head_dim
    int rope_dim
    int o_groups
    int o_lora
    int window           # in effect: min(sliding_window, n_ctx)
    int hc
    int hc_iters
    float hc_eps
    float eps
    int n_expert
    int n_used
    bint w_norm
    float w_scale
    int idx_heads
    int idx_dim
    int idx_topk
    int n_vocab
    bint attn_f16        # attention as llama.cpp's flash-attention path (f16 keys/values); else all f32
    bint cpu_only        # every tensor in host memory (CPU-only backend set): our CPU custom ops may be used
    int gemm_isa         # prompt-processing products through kernels/dsv4_gemm.h with this instruction set; 0: ggml's
    int gemm_min_tokens  # ... for ubatches of at least this many tokens


cdef struct LayerW:
    int ratio            # 0, 4 or 128
    bint hash            # hash-routed (tid2eid) layer
    float clamp_exp
    float clamp_sh
    dsv4_rope_params rope
    g.ggml_tensor * attn_norm
    g.ggml_tensor * sinks
    g.ggml_tensor * q_a
    g.ggml_tensor * q_a_norm
    g.ggml_tensor * q_b
    g.ggml_tensor * kv
    g.ggml_tensor * kv_norm
    g.ggml_tensor * o_a
    g.ggml_tensor * o_b
    g.ggml_tensor * hc_attn_fn
    g.ggml_tensor * hc_attn_base
    g.ggml_tensor * hc_attn_scale
    g.ggml_tensor * hc_ffn_fn
    g.ggml_tensor * hc_ffn_base
    g.ggml_tensor * hc_ffn_scale
    g.ggml_tensor * gate_inp
    g.ggml_tensor * tid2eid    # hash layers: [n_used, n_vocab] I32
    g.ggml_tensor * probs_b
    g.ggml_tensor * ffn_norm
    g.ggml_tensor * gate_exps
    g.ggml_tensor * up_exps
    g.ggml_tensor * down_exps
    g.ggml_tensor * gate_sh
    g.ggml_tensor * up_sh
    g.ggml_tensor * down_sh
    g.ggml_tensor * c_kv       # KV compressor (ratio != 0)
    g.ggml_tensor * c_gate
    g.ggml_tensor * c_ape
    g.ggml_tensor * c_norm
    g.ggml_tensor * i_proj     # lightning indexer (ratio == 4)
    g.ggml_tensor * i_q_b
    g.ggml_tensor * i_kv
    g.ggml_tensor * i_gate
    g.ggml_tensor * i_ape
    g.ggml_tensor * i_norm


cdef struct GlobalW:
    g.ggml_tensor * tok_embd
    g.ggml_tensor * out_norm
    g.ggml_tensor * output
    g.ggml_tensor * hc_fn
    g.ggml_tensor * hc_base
    g.ggml_tensor * hc_scale


# persistent per-sequence state of one layer (tensors in the context's state buffer)
cdef struct LayerState:
    g.ggml_tensor * raw      # [d, S] ring of post-rope kv latents (slot = position mod S)
    g.ggml_tensor * comp     # [d, n_ctx/ratio] compressed entries (CSA or HCA)
    g.ggml_tensor * lid      # [di, n_ctx/4] indexer keys (CSA layers)
    g.ggml_tensor * st_kv    # [coff*d, cap] f32: compressor rows not yet consumed, in position order
    g.ggml_tensor * st_sc
    g.ggml_tensor * ist_kv   # the indexer compressor's rows (CSA layers)
    g.ggml_tensor * ist_sc


# what the host knows about one compressor ratio for this ubatch
cdef struct CompPlan:
    int ratio
    int overlap      # 1 for ratio 4 (each entry also reads the previous block)
    int l0           # state rows read (positions s0 .. p0-1)
    int nb           # blocks completed in this ubatch
    int b0           # index of the first of them
    int n_vis        # entries visible to the last token: (p0 + n) / ratio
    int keep_from    # first row of [state ; ubatch] that stays in the state
    int l1           # state rows after this ubatch


cdef struct UBatch:
    int n            # tokens
    int p0           # position of the first
    int n_out        # logits rows wanted (the last n_out tokens)
    int ring         # rows of the raw ring
    int want_routes  # 1: expose every layer's selected experts (inp.routes) for MoE statistics
    CompPlan c4
    CompPlan c128


# graph inputs the host fills after allocation (NULL when absent from this graph)
cdef struct Inputs:
    g.ggml_tensor * tokens     # I32 [n]
    g.ggml_tensor * pos        # I32 [n]
    g.ggml_tensor * raw_slot   # I64 [n]: ring slot of each token
    g.ggml_tensor * raw_mask   # F32 [ring, n]: 0 where visible, -inf elsewhere
    g.ggml_tensor * ape4       # I32 [n]: position mod 4
    g.ggml_tensor * ape128     # I32 [n]: position mod 128
    g.ggml_tensor * blk4       # I32 [nb]: start positions of the completed blocks
    g.ggml_tensor * blk128
    g.ggml_tensor * vis4       # F32 [n_vis, n]: entry b visible to token t (b < (p+1)/ratio)
    g.ggml_tensor * vis128
    g.ggml_tensor ** routes    # [n_layer] I32 [k, n] outputs: the experts each token was routed to (want_routes)


cdef g.ggml_tensor * build_graph(g.ggml_context * ctx, g.ggml_cgraph * gf, const Hparams * hp,
                                 const GlobalW * gw, const LayerW * lw, const LayerState * st,
                                 const UBatch * ub, Inputs * inp) noexcept nogil
