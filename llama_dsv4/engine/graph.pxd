# The deepseek4 graph: the C-level structs the builder reads (filled once by the context from DSV4Params and the
# mapped weights) and the builder itself. No Python objects cross this boundary.
cimport ggml as g
from dsv4_ops cimport dsv4_prefetch_stats, dsv4_rope_params


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
    dsv4_prefetch_stats * prefetch  # not NULL (cpu_only): each layer's routed experts' missing pages are asked for
                                    # as soon as its routing is known (kernels/dsv4_prefetch.h); the counters


# A layer's attention kind, named by its compression ratio (model/params.py LayerKind holds the same values)
cpdef enum LayerKind:
    SWA = 0      # the sliding window only
    CSA = 4      # + compressed sparse: an entry per 4 positions (overlapping blocks), top-k by the lightning indexer
    HCA = 128    # + heavily compressed: an entry per 128 positions, all visible entries

cdef enum:
    N_COMP = 2   # compressed kinds, indexed COMP_CSA / COMP_HCA in the per-ubatch plans and inputs
    COMP_CSA = 0
    COMP_HCA = 1


# ---------------------------------------------------------------- weights, one struct per block (bound from
# model/tensors.py, where each tensor's `dest` names its field here)

cdef struct HcW:            # a hyper-connection mixer (before attention, before the MoE)
    g.ggml_tensor * fn
    g.ggml_tensor * base
    g.ggml_tensor * scale

cdef struct CompressorW:    # pools a block of rows into one cache entry (the KV compressor, the indexer's)
    g.ggml_tensor * kv
    g.ggml_tensor * gate
    g.ggml_tensor * ape
    g.ggml_tensor * norm

cdef struct IndexerW:       # the lightning indexer (CSA layers)
    g.ggml_tensor * proj
    g.ggml_tensor * q_b
    CompressorW comp

cdef struct AttnW:
    int kind                # LayerKind
    dsv4_rope_params rope
    g.ggml_tensor * norm
    g.ggml_tensor * sinks
    g.ggml_tensor * q_a
    g.ggml_tensor * q_a_norm
    g.ggml_tensor * q_b
    g.ggml_tensor * kv
    g.ggml_tensor * kv_norm
    g.ggml_tensor * o_a
    g.ggml_tensor * o_b
    CompressorW comp        # compressed kinds
    IndexerW idx            # CSA

cdef struct HotW:            # a layer's hot experts in a device's memory (engine/hot_experts.py; NULL gate: none)
    g.ggml_tensor * gate       # [K, M, H]: slot j holds the rows of gate_exps of the expert in slot j
    g.ggml_tensor * up         # [K, M, H]
    g.ggml_tensor * down       # [M, K, H]
    g.ggml_tensor * slot       # I32 [1, E]: expert e's slot (0 for a cold expert, whose weight there is 0)
    g.ggml_tensor * cold       # I32 [1, E]: e for a cold expert, else one cold expert (whose weight there is 0)
    g.ggml_tensor * is_hot     # F32 [1, E]: 1 for a hot expert, else 0
    bint all_hot               # every expert is hot: no product on the CPU

cdef struct MoeW:
    bint hash               # hash-routed layer: the token's row of tid2eid picks the experts
    float clamp_exp
    float clamp_sh
    g.ggml_tensor * norm
    g.ggml_tensor * gate_inp
    g.ggml_tensor * tid2eid    # hash layers: [n_used, n_vocab] I32
    g.ggml_tensor * probs_b    # other layers: the selection bias
    g.ggml_tensor * gate_exps
    g.ggml_tensor * up_exps
    g.ggml_tensor * down_exps
    g.ggml_tensor * gate_sh
    g.ggml_tensor * up_sh
    g.ggml_tensor * down_sh
    HotW hot

cdef struct LayerW:
    HcW hc_attn
    AttnW attn
    HcW hc_ffn
    MoeW ffn


cdef struct MtpW:           # the MTP (nextn) block's own tensors, beside its LayerW (docs/speculative.md)
    g.ggml_tensor * eh_proj     # [2D, D]: [enorm(embedding of the next token) ; hnorm(the main model's streams)]
    g.ggml_tensor * enorm
    g.ggml_tensor * hnorm
    g.ggml_tensor * embed       # optional: its own embedding (NULL: the model's)
    g.ggml_tensor * head        # optional: its own output head (NULL: the model's)
    g.ggml_tensor * head_norm   # optional: its own output norm (NULL: the model's)


cdef struct GlobalW:
    g.ggml_tensor * tok_embd
    g.ggml_tensor * out_norm
    g.ggml_tensor * output
    g.ggml_tensor * hc_fn
    g.ggml_tensor * hc_base
    g.ggml_tensor * hc_scale


# ---------------------------------------------------------------- per-sequence state of one layer (tensors in the
# context's state buffer; engine/memory.py lists them, named by field)

cdef struct CompressorState:
    g.ggml_tensor * kv       # [coff*d, cap] f32: the compressor's rows not yet pooled, in position order
    g.ggml_tensor * sc       # their scores

cdef struct LayerState:
    g.ggml_tensor * raw      # [d, S] ring of post-rope kv latents (slot = position mod S)
    g.ggml_tensor * comp     # [d, n_ctx/ratio] compressed entries (CSA or HCA)
    g.ggml_tensor * lid      # [di, n_ctx/4] indexer keys (CSA)
    CompressorState c        # the KV compressor's rows
    CompressorState ic       # the indexer compressor's rows (CSA)


# ---------------------------------------------------------------- one ubatch

# what the host knows about one compressed kind for one sequence's part of this ubatch
cdef struct CompPlan:
    int ratio
    int overlap      # 1 for CSA (each entry also reads the previous block)
    int l0           # state rows read (positions s0 .. p0-1)
    int nb           # blocks completed in this ubatch
    int b0           # index of the first of them
    int n_vis        # entries visible to the last token: (p0 + n) / ratio
    int keep_from    # first row of [state ; ubatch] that stays in the state
    int l1           # state rows after this ubatch
    int nbk          # rows also copied to the state's backup rows (a truncation by up to keep_back positions
    int bk_from      # needs them again: docs/speculative.md), from this row of [state ; ubatch]
    int bk_row       # to this row of the state (its backup rows start there)


cdef enum:
    MAX_SEQ = 256    # sequences a context may hold (and a ubatch may mix)


cdef struct SeqPlan:     # one sequence's share of a ubatch (docs/batching.md)
    int n            # its tokens: rows t0 .. t0+n-1 of the ubatch
    int t0
    int p0           # position of its first token
    const LayerState * st    # its state, [n_layer]
    CompPlan comp[N_COMP]


cdef struct UBatch:
    int n            # tokens, all sequences
    int n_out        # logits rows wanted (one sequence: its last n_out tokens; several: the rows inp.out_rows names)
    int ring         # rows of the raw ring
    int want_routes  # 1: expose every layer's selected experts (inp.routes) for MoE statistics
    int want_h       # 1: expose the final hyper-connection streams of every row (inp.h_out), the MTP's input
    int n_seq
    const SeqPlan * seq  # [n_seq], in row order


# one sequence's graph inputs (NULL when absent from this graph)
cdef struct SeqInputs:
    g.ggml_tensor * raw_slot      # I64 [n]: ring slot of each token
    g.ggml_tensor * raw_mask      # F32 [ring, n]: 0 where visible, -inf elsewhere
    g.ggml_tensor * blk[N_COMP]   # I32 [nb]: start positions of the blocks completed in this ubatch
    g.ggml_tensor * vis[N_COMP]   # F32 [n_vis, n]: entry b visible to token t (b < (p+1)/ratio)


# graph inputs the host fills after allocation (NULL when absent from this graph)
cdef struct Inputs:
    g.ggml_tensor * tokens     # I32 [n]
    g.ggml_tensor * pos        # I32 [n]
    g.ggml_tensor * ape[N_COMP]   # I32 [n]: position mod ratio
    g.ggml_tensor * out_rows   # I32 [n_out]: the rows whose logits are wanted (several sequences, n_out < n)
    SeqInputs * seq            # [n_seq] (the context's array; the builder fills it)
    g.ggml_tensor ** routes    # [n_layer] I32 [k, n] outputs: the experts each token was routed to (want_routes)
    g.ggml_tensor * h_in       # F32 [D*hc, n]: the MTP graph's streams in (the main model's, or the MTP's own)
    g.ggml_tensor * h_out      # F32 [D*hc, n] output: the final streams of every row (want_h)


cdef inline int comp_index(int kind) noexcept nogil:
    """Where a compressed kind's plan and inputs live in SeqPlan.comp, Inputs.ape, SeqInputs.blk / .vis."""
    return COMP_CSA if kind == CSA else COMP_HCA


cdef g.ggml_tensor * build_mtp_graph(g.ggml_context * ctx, g.ggml_cgraph * gf, const Hparams * hp,
                                     const GlobalW * gw, const LayerW * lw, const MtpW * mw, int il,
                                     const UBatch * ub, Inputs * inp) noexcept nogil
cdef g.ggml_tensor * build_graph(g.ggml_context * ctx, g.ggml_cgraph * gf, const Hparams * hp,
                                 const GlobalW * gw, const LayerW * lw, const UBatch * ub, Inputs * inp) noexcept nogil
