# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The DeepSeek V4 graph for one ubatch of one or several sequences (docs/architecture.md §6-10, docs/batching.md),
block by block.

Graph building only: the context fills the structs (weights, state tensors, the ubatch plan) and the inputs.
Token-wise blocks run on the rows of all sequences together; the blocks that read a sequence's state run on views
of its rows. Cache and state writes are expanded into the graph as soon as they are built, so they run before the
nodes that read the same memory later in the graph.
"""
cimport ggml as g
from dsv4_ops cimport (DSV4_GEMM_VNNI, dsv4_concat_cpu, dsv4_concat_fn, dsv4_dense_gemm_ok, dsv4_dense_kq_ok,
                       dsv4_hc_gates_cpu, dsv4_hc_post_cpu, dsv4_moe_gemm_ok,
                       dsv4_moe_prefetch, dsv4_mul_mat_id_kq, dsv4_mul_mat_kq, dsv4_mul_mat_q80, dsv4_q8k_prep,
                       dsv4_q80_prep, dsv4_rope_params, dsv4_rope_tail, dsv4_rope_tail_back, dsv4_swiglu_clamp,
                       dsv4_top_k)
from libc.math cimport INFINITY, sqrtf
from libc.stdint cimport int64_t

from .graph cimport (COMP_CSA, COMP_HCA, CSA, HCA, MAX_SEQ, N_COMP, SWA, AttnW, CompPlan, CompressorState, CompressorW,
                    GlobalW, Hparams, HcW, HotW, Inputs, LayerState, LayerW, MoeW, MtpW, SeqInputs, SeqPlan, UBatch,
                    comp_index)

ctypedef g.ggml_tensor T
ctypedef g.ggml_context C


cdef inline T * input_1d(C * ctx, g.ggml_type t, int64_t n) noexcept nogil:
    cdef T * x = g.ggml_new_tensor_1d(ctx, t, n)
    g.ggml_set_input(x)
    return x


cdef inline T * input_2d(C * ctx, g.ggml_type t, int64_t n0, int64_t n1) noexcept nogil:
    cdef T * x = g.ggml_new_tensor_2d(ctx, t, n0, n1)
    g.ggml_set_input(x)
    return x


cdef inline T * named(T * t, const char * name, int il) noexcept nogil:
    """Name a node as llama.cpp does ("name-il", or "name" for il < 0), for debugging captures."""
    if il >= 0:
        g.ggml_format_name(t, "%s-%d", name, il)
    else:
        g.ggml_set_name(t, name)
    return t


cdef inline T * norm(C * ctx, T * x, T * w, float eps) noexcept nogil:
    return g.ggml_mul(ctx, g.ggml_rms_norm(ctx, x, eps), w)


# One activation tensor quantized for our dense products, made at its first product and kept for the next ones of
# the same x: Q8_0 rows (dsv4_q80_prep) and Q8_K rows (dsv4_q8k_prep), NULL until needed.
cdef struct Prep:
    T * q80
    T * q8k


cdef T * mm(C * ctx, const Hparams * hp, T * w, T * x, Prep * prep) noexcept nogil:
    """ggml_mul_mat(w, x), or on the CPU our product for w's type: Q8_0 with AVX-512 VNNI for any number of tokens
    (kernels/dsv4_gemm_vnni.c: decode too, where PyPI's ggml has no VNNI dot product), or Q2_K..Q6_K for ubatches of
    hp.gemm_min_tokens or more (kernels/dsv4_moe_gemm.c). prep (or NULL) keeps x's quantizations for the next product
    of the same x."""
    cdef Prep local
    cdef T * out = NULL
    cdef bint q80 = hp.gemm_isa == DSV4_GEMM_VNNI and dsv4_dense_gemm_ok(w, x)
    if hp.gemm_isa == 0 or (x.ne[1] < hp.gemm_min_tokens and not q80):
        return g.ggml_mul_mat(ctx, w, x)
    if prep == NULL:
        local.q80 = local.q8k = NULL
        prep = &local
    if q80:
        if prep.q80 == NULL:
            prep.q80 = dsv4_q80_prep(ctx, x)
        out = dsv4_mul_mat_q80(ctx, w, prep.q80) if prep.q80 != NULL else NULL
    elif dsv4_dense_kq_ok(w, x):
        if prep.q8k == NULL:
            prep.q8k = dsv4_q8k_prep(ctx, x, hp.gemm_isa)
        out = dsv4_mul_mat_kq(ctx, w, prep.q8k, hp.gemm_isa) if prep.q8k != NULL else NULL
    return out if out != NULL else g.ggml_mul_mat(ctx, w, x)


cdef T * hc_post(C * ctx, const Hparams * hp, T * x, T * res, T * post, T * comb) noexcept nogil:
    """The post mix (docs/architecture.md §7.2): ggml's op, or on the CPU our kernel (kernels/dsv4_hc.c, several times faster)."""
    cdef T * out = dsv4_hc_post_cpu(ctx, x, res, post, comb) if hp.cpu_only else NULL
    return out if out != NULL else g.ggml_dsv4_hc_post(ctx, x, res, post, comb)


cdef inline T * cat(C * ctx, const Hparams * hp, T * a, T * b, int dim) noexcept nogil:
    """ggml_concat(a, b, dim); on a CPU-only backend set our row-copying op (kernels/dsv4_concat.h) where it applies."""
    cdef T * out = dsv4_concat_cpu(ctx, a, b, dim) if hp.cpu_only else NULL
    return out if out != NULL else g.ggml_concat(ctx, a, b, dim)


cdef inline dsv4_concat_fn rope_cat(const Hparams * hp) noexcept nogil:
    """How the rope ops join a head's plain and rotated parts (kernels/dsv4_ops.h)."""
    return dsv4_concat_cpu if hp.cpu_only else <dsv4_concat_fn> NULL


cdef inline T * rows(C * ctx, T * t, int64_t n, int64_t first) noexcept nogil:
    """Rows [first, first + n) of a 2-D tensor."""
    return g.ggml_view_2d(ctx, t, t.ne[0], n, t.nb[1], first * t.nb[1])


cdef inline T * tokens_3d(C * ctx, T * t, const SeqPlan * sp) noexcept nogil:
    """A sequence's tokens of a 3-D tensor [a, b, n]: [a, b, sp.n] from token sp.t0."""
    return g.ggml_view_3d(ctx, t, t.ne[0], t.ne[1], sp.n, t.nb[1], t.nb[2], sp.t0 * t.nb[2])


cdef T * concat_all(C * ctx, const Hparams * hp, T ** parts, int m, int dim) noexcept nogil:
    """parts[0] .. parts[m-1] concatenated along `dim`, in order, as a balanced tree (each row copied log2(m) times,
    not m times); overwrites parts."""
    cdef int i
    while m > 1:
        for i in range(m // 2):
            parts[i] = cat(ctx, hp, parts[2 * i], parts[2 * i + 1], dim)
        if m % 2:
            parts[m // 2] = parts[m - 1]
        m = (m + 1) // 2
    return parts[0]


# ------------------------------------------------------------------------------------------ hyper-connections

cdef T * hc_gate(C * ctx, T * mix, T * scale, T * base, int64_t hc, int k, float eps) noexcept nogil:
    """Gate k of the mixer's output in ggml ops (docs/architecture.md §7.1): sigmoid(mix[k*hc:(k+1)*hc] * scale[k] +
    base[k*hc:(k+1)*hc]), then + eps for pre (k = 0) or x 2 for post (k = 1); dsv4_hc_gates_cpu's bytes."""
    cdef T * x = g.ggml_view_2d(ctx, mix, hc, mix.ne[1], mix.nb[1], k * hc * sizeof(float))
    x = g.ggml_add(ctx, g.ggml_mul(ctx, x, g.ggml_view_1d(ctx, scale, 1, k * sizeof(float))),
                   g.ggml_view_1d(ctx, base, hc, k * hc * sizeof(float)))
    x = g.ggml_sigmoid(ctx, x)
    return g.ggml_scale_bias(ctx, x, 1.0, eps) if k == 0 else g.ggml_scale(ctx, x, 2.0)


cdef T * hc_pre(C * ctx, const Hparams * hp, const HcW * W, T * S, T ** post, T ** comb, int il) noexcept nogil:
    """Mix the HC streams S [D, hc, n] into one [D, n]; also the post weights [hc, n] and the Sinkhorn-normalised
    combination [hc(dst), hc(src), n] that hc_post needs (docs/architecture.md §7.1)."""
    cdef int64_t n = S.ne[2], hc = hp.hc
    cdef T * mix = mm(ctx, hp, W.fn, g.ggml_rms_norm(ctx, g.ggml_reshape_2d(ctx, S, hc * hp.n_embd, n), hp.eps), NULL)
    named(mix, "hc_mixes", il)
    cdef T * gates = dsv4_hc_gates_cpu(ctx, mix, W.scale, W.base, <int> hc, 2, hp.hc_eps) if hp.cpu_only else NULL
    cdef T * pre
    if gates != NULL:  # both gates in one CPU op, the same bytes (kernels/dsv4_hc.h)
        pre = g.ggml_view_2d(ctx, gates, hc, n, gates.nb[1], 0)
        post[0] = g.ggml_view_2d(ctx, gates, hc, n, gates.nb[1], gates.nb[2])
    else:
        pre = hc_gate(ctx, mix, W.scale, W.base, hc, 0, hp.hc_eps)
        post[0] = hc_gate(ctx, mix, W.scale, W.base, hc, 1, hp.hc_eps)
    named(pre, "hc_pre", il)
    named(post[0], "hc_post", il)
    comb[0] = named(g.ggml_dsv4_hc_comb(ctx, mix, W.scale, W.base, hp.hc_eps, hp.hc_iters), "hc_comb", il)
    return g.ggml_dsv4_hc_pre(ctx, S, pre)


cdef T * hc_head(C * ctx, const Hparams * hp, const GlobalW * gw, T * S) noexcept nogil:
    """The final collapse of the streams (docs/architecture.md §7.3)."""
    cdef T * mix = mm(ctx, hp, gw.hc_fn, g.ggml_rms_norm(
        ctx, g.ggml_reshape_2d(ctx, S, hp.hc * hp.n_embd, S.ne[2]), hp.eps), NULL)
    cdef T * pre = dsv4_hc_gates_cpu(ctx, mix, gw.hc_scale, gw.hc_base, hp.hc, 1, hp.hc_eps) if hp.cpu_only else NULL
    if pre != NULL:
        pre = g.ggml_reshape_2d(ctx, pre, hp.hc, S.ne[2])
    else:
        pre = hc_gate(ctx, mix, gw.hc_scale, gw.hc_base, hp.hc, 0, hp.hc_eps)
    return g.ggml_dsv4_hc_pre(ctx, S, pre)

# ------------------------------------------------------------------------------------------ compressors


cdef void compressor_rows(C * ctx, const Hparams * hp, const CompressorW * W, T * ape, T * x, Prep * px, T ** ckv,
                          T ** csc) noexcept nogil:
    """A compressor's token-wise part, on the rows of all sequences: its values [width, n] and scores (the gate plus
    the slot's position bias, ape = position mod ratio)."""
    ckv[0] = mm(ctx, hp, W.kv, x, px)
    csc[0] = g.ggml_add(ctx, mm(ctx, hp, W.gate, x, px), g.ggml_get_rows(ctx, W.ape, ape))


cdef void compress(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const CompPlan * cp, T * starts,
                   const CompressorW * W, const CompressorState * st, T * cache, T * ckv, T * csc, int width,
                   const dsv4_rope_params * rope) noexcept nogil:
    """Feed one sequence's rows (ckv, csc: compressor_rows of its tokens) to its compressor state (docs/architecture.md
    §8.3, §11.2): pool every block that completes into a cache entry (normed, roped at the block start: starts) and keep
    the rows that later blocks still need in the state."""
    cdef T * xk = ckv
    cdef T * xs = csc
    if cp.l0 > 0:  # [state rows ; this ubatch's rows], in position order
        xk = cat(ctx, hp, rows(ctx, st.kv, cp.l0, 0), ckv, 1)
        xs = cat(ctx, hp, rows(ctx, st.sc, cp.l0, 0), csc, 1)
    cdef int64_t R = cp.ratio, nb = cp.nb
    cdef size_t blk = R * xk.nb[1]
    cdef T * vk
    cdef T * vs
    cdef T * e
    if nb > 0:
        if cp.overlap:
            # entry m pools the first half of block m-1's channels and the second half of block m's: 2R slots
            vk = cat(ctx, hp, g.ggml_cont(ctx, g.ggml_view_3d(ctx, xk, width, R, nb, xk.nb[1], blk, 0)),
                     g.ggml_cont(ctx, g.ggml_view_3d(ctx, xk, width, R, nb, xk.nb[1], blk,
                                                     blk + width * sizeof(float))), 1)
            vs = cat(ctx, hp, g.ggml_cont(ctx, g.ggml_view_3d(ctx, xs, width, R, nb, xs.nb[1], blk, 0)),
                     g.ggml_cont(ctx, g.ggml_view_3d(ctx, xs, width, R, nb, xs.nb[1], blk,
                                                     blk + width * sizeof(float))), 1)
        else:
            vk = g.ggml_view_3d(ctx, xk, width, R, nb, xk.nb[1], blk, 0)
            vs = g.ggml_view_3d(ctx, xs, width, R, nb, xs.nb[1], blk, 0)
        # softmax over the slots of each channel: slots to ne0
        vk = g.ggml_cont(ctx, g.ggml_permute(ctx, vk, 1, 0, 2, 3))
        vs = g.ggml_cont(ctx, g.ggml_permute(ctx, vs, 1, 0, 2, 3))
        e = g.ggml_sum_rows(ctx, g.ggml_mul(ctx, vk, g.ggml_soft_max(ctx, vs)))  # [1, width, nb]
        e = norm(ctx, g.ggml_reshape_2d(ctx, e, width, nb), W.norm, hp.eps)
        e = dsv4_rope_tail(ctx, g.ggml_reshape_3d(ctx, e, width, 1, nb), starts, hp.rope_dim, rope, rope_cat(hp))
        g.ggml_build_forward_expand(gf, g.ggml_cpy(ctx, g.ggml_reshape_2d(ctx, e, width, nb),
                                                   rows(ctx, cache, nb, cp.b0)))
    if cp.l1 > 0:
        g.ggml_build_forward_expand(gf, g.ggml_cpy(ctx, rows(ctx, xk, cp.l1, cp.keep_from), rows(ctx, st.kv, cp.l1, 0)))
        g.ggml_build_forward_expand(gf, g.ggml_cpy(ctx, rows(ctx, xs, cp.l1, cp.keep_from), rows(ctx, st.sc, cp.l1, 0)))
    if cp.nbk > 0:  # the rows before those kept that a short truncation needs again (speculative decoding)
        g.ggml_build_forward_expand(gf, g.ggml_cpy(ctx, rows(ctx, xk, cp.nbk, cp.bk_from),
                                                   rows(ctx, st.kv, cp.nbk, cp.bk_row)))
        g.ggml_build_forward_expand(gf, g.ggml_cpy(ctx, rows(ctx, xs, cp.nbk, cp.bk_from),
                                                   rows(ctx, st.sc, cp.nbk, cp.bk_row)))

# ------------------------------------------------------------------------------------------ attention


cdef T * indexer_top(C * ctx, const Hparams * hp, const LayerState * st, const CompPlan * cp, T * vis, T * iq,
                     T * iw) noexcept nogil:
    """The lightning indexer (docs/architecture.md §8.6) of one sequence (iq [di, Hi, n] its roped indexer queries,
    iw [Hi, n] its head weights): for each token, the indices [kk, n] of the top-k visible CSA entries by indexer
    score (k = min(top_k, entries visible to the sequence's last token))."""
    cdef int64_t nv = cp.n_vis
    cdef T * keys = g.ggml_view_3d(ctx, st.lid, hp.idx_dim, 1, nv, st.lid.nb[1], st.lid.nb[1], 0)
    cdef T * score = g.ggml_lightning_indexer(ctx, iq, keys, iw, g.ggml_cast(ctx, vis, g.GGML_TYPE_F16))
    cdef int k = hp.idx_topk if hp.idx_topk < nv else <int> nv
    # our kernel breaks ties as llama.cpp's CPU top-k does; ggml's op where the graph must be portable (RPC devices)
    return dsv4_top_k(ctx, score, k) if hp.cpu_only else g.ggml_top_k(ctx, score, k)


cdef T * selection_mask(C * ctx, T * top, T * vis, int64_t nv) noexcept nogil:
    """[nv, n]: 0 where entry b is among token t's selected entries and visible to it, -inf elsewhere."""
    cdef int64_t kk = top.ne[0], n = top.ne[1]
    cdef T * sel = g.ggml_fill(ctx, g.ggml_new_tensor_3d(ctx, g.GGML_TYPE_F32, 1, nv, n), -INFINITY)
    cdef T * zero = g.ggml_fill(ctx, g.ggml_new_tensor_3d(ctx, g.GGML_TYPE_F32, 1, kk, n), 0.0)
    sel = g.ggml_set_rows(ctx, sel, zero, top)
    return g.ggml_add(ctx, g.ggml_reshape_2d(ctx, sel, nv, n), vis)


cdef struct AttnRows:       # an attention layer's token-wise results, rows of all sequences (NULL when absent)
    T * q                   # [d, H, n] roped queries
    T * kv                  # [d, n] roped key/value vectors
    T * ckv                 # the KV compressor's values and scores (compressed kinds)
    T * csc
    T * ickv                # the indexer compressor's (CSA)
    T * icsc
    T * iq                  # [di, Hi, n] roped indexer queries (CSA, when an entry is visible)
    T * iw                  # [Hi, n] indexer head weights


cdef T * attend(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const AttnW * A, const LayerState * st,
                const SeqPlan * sp, const SeqInputs * si, const AttnRows * r) noexcept nogil:
    """One sequence's attention (docs/architecture.md §8.3-8.7) on views of its rows of r: its kv rows into its
    ring, its compressors, its indexer's selection, and attention with sinks over its window and its visible
    compressed entries; returns [d, H, n] for its n tokens."""
    cdef int64_t n = sp.n, t0 = sp.t0, d = hp.head_dim
    g.ggml_build_forward_expand(gf, g.ggml_set_rows(ctx, st.raw, rows(ctx, r.kv, n, t0), si.raw_slot))
    cdef T * keys = st.raw
    cdef T * mask = si.raw_mask
    cdef T * top
    cdef T * sel
    cdef const CompPlan * cp
    cdef int c
    if A.kind != SWA:
        c = comp_index(A.kind)
        cp = &sp.comp[c]
        compress(ctx, gf, hp, cp, si.blk[c], &A.comp, &st.c, st.comp, rows(ctx, r.ckv, n, t0), rows(ctx, r.csc, n, t0),
                 <int> d, &A.rope)
        if A.kind == CSA:
            compress(ctx, gf, hp, cp, si.blk[c], &A.idx.comp, &st.ic, st.lid, rows(ctx, r.ickv, n, t0),
                     rows(ctx, r.icsc, n, t0), hp.idx_dim, &A.rope)
        if cp.n_vis > 0 and A.kind == HCA:  # every visible entry
            keys = cat(ctx, hp, keys, rows(ctx, st.comp, cp.n_vis, 0), 1)
            mask = cat(ctx, hp, mask, si.vis[c], 0)
        elif cp.n_vis > 0:  # CSA: the entries the indexer selects
            top = indexer_top(ctx, hp, st, cp, si.vis[c], tokens_3d(ctx, r.iq, sp), rows(ctx, r.iw, n, t0))
            if n == 1:  # decode: gather the selected entries (all visible to the one token), O(top_k) per token
                sel = g.ggml_get_rows(ctx, rows(ctx, st.comp, cp.n_vis, 0), g.ggml_reshape_1d(ctx, top, top.ne[0]))
                # on the CPU the entries join the f16 window (attention's type: the same bytes); device backends
                # keep the f32 join every backend's concat implements
                if hp.cpu_only and hp.attn_f16 and keys.type == g.GGML_TYPE_F16:
                    sel = g.ggml_cast(ctx, sel, g.GGML_TYPE_F16)
                elif keys.type != g.GGML_TYPE_F32:
                    keys = g.ggml_cast(ctx, keys, g.GGML_TYPE_F32)
                keys = cat(ctx, hp, keys, sel, 1)
                mask = cat(ctx, hp, mask, g.ggml_fill(ctx, g.ggml_new_tensor_2d(
                    ctx, g.GGML_TYPE_F32, top.ne[0], 1), 0.0), 0)
            else:  # a batch: every visible entry, masked to each token's selection
                keys = cat(ctx, hp, keys, rows(ctx, st.comp, cp.n_vis, 0), 1)
                mask = cat(ctx, hp, mask, selection_mask(ctx, top, si.vis[c], cp.n_vis), 0)

    # With attn_f16, exactly llama.cpp's flash-attention path: keys and values as one f16 tensor whatever the cache
    # type, so the same CPU kernels run (values accumulated in f16 for small batches, in f32 tiles for large ones).
    # Without attn_f16: everything in f32.
    if hp.attn_f16 and keys.type != g.GGML_TYPE_F16:
        keys = g.ggml_cast(ctx, keys, g.GGML_TYPE_F16)
    elif not hp.attn_f16 and keys.type != g.GGML_TYPE_F32:
        keys = g.ggml_cast(ctx, keys, g.GGML_TYPE_F32)
    cdef T * k3 = g.ggml_reshape_3d(ctx, keys, d, keys.ne[1], 1)
    cdef T * out = g.ggml_flash_attn_ext(ctx, g.ggml_permute(ctx, tokens_3d(ctx, r.q, sp), 0, 2, 1, 3), k3, k3,
                                         g.ggml_cast(ctx, mask, g.GGML_TYPE_F16), 1.0 / sqrtf(<float> d), 0.0, 0.0)
    g.ggml_flash_attn_ext_add_sinks(out, A.sinks)
    g.ggml_flash_attn_ext_set_prec(out, g.GGML_PREC_F32)
    return out


cdef T * attention(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const AttnW * A, int il, const UBatch * ub,
                   Inputs * inp, T * x) noexcept nogil:
    """docs/architecture.md §8: q low-rank path, the single latent K=V, the compressed keys, attention with sinks over the
    sliding window and the visible compressed entries (per sequence, attend), de-rope, grouped output projection."""
    cdef int64_t n = x.ne[1], d = hp.head_dim, H = hp.n_head, G = hp.o_groups
    cdef AttnRows r
    cdef Prep px, pqr  # x and qr quantized once for all their products
    px.q80 = px.q8k = pqr.q80 = pqr.q8k = NULL
    cdef T * qr = norm(ctx, mm(ctx, hp, A.q_a, x, &px), A.q_a_norm, hp.eps)
    cdef T * q = g.ggml_rms_norm(ctx, g.ggml_reshape_3d(ctx, mm(ctx, hp, A.q_b, qr, &pqr), d, H, n), hp.eps)
    r.q = named(dsv4_rope_tail(ctx, q, inp.pos, hp.rope_dim, &A.rope, rope_cat(hp)), "q", il)
    cdef T * kv = norm(ctx, mm(ctx, hp, A.kv, x, &px), A.kv_norm, hp.eps)
    kv = named(dsv4_rope_tail(ctx, g.ggml_reshape_3d(ctx, kv, d, 1, n), inp.pos, hp.rope_dim, &A.rope, rope_cat(hp)),
               "kv", il)
    r.kv = g.ggml_reshape_2d(ctx, kv, d, n)
    r.ckv = r.csc = r.ickv = r.icsc = r.iq = r.iw = NULL
    cdef int s, c
    cdef bint any_vis = False
    if A.kind != SWA:
        c = comp_index(A.kind)
        compressor_rows(ctx, hp, &A.comp, inp.ape[c], x, &px, &r.ckv, &r.csc)
        if A.kind == CSA:
            compressor_rows(ctx, hp, &A.idx.comp, inp.ape[c], x, &px, &r.ickv, &r.icsc)
            for s in range(ub.n_seq):
                any_vis = any_vis or ub.seq[s].comp[c].n_vis > 0
        if any_vis:  # the indexer's token-wise part (docs/architecture.md §8.6)
            r.iq = dsv4_rope_tail(ctx, g.ggml_reshape_3d(ctx, mm(ctx, hp, A.idx.q_b, qr, &pqr), hp.idx_dim,
                                                         hp.idx_heads, n), inp.pos, hp.rope_dim, &A.rope,
                                  rope_cat(hp))
            r.iw = g.ggml_scale(ctx, mm(ctx, hp, A.idx.proj, x, &px),
                                1.0 / sqrtf(<float> (hp.idx_dim * hp.idx_heads)))

    cdef T * parts[MAX_SEQ]
    for s in range(ub.n_seq):
        parts[s] = attend(ctx, gf, hp, A, &ub.seq[s].st[il], &ub.seq[s], &inp.seq[s], &r)
    cdef T * out = named(concat_all(ctx, hp, parts, ub.n_seq, 2), "attn_raw", il)
    out = named(dsv4_rope_tail_back(ctx, out, inp.pos, hp.rope_dim, &A.rope, rope_cat(hp)), "attn_derope",
                il)  # [d, H, n]

    # grouped output LoRA: group g = heads g*H/G .. (g+1)*H/G - 1, each with its own Ro rows of o_a
    out = g.ggml_permute(ctx, g.ggml_reshape_3d(ctx, out, d * H // G, G, n), 0, 2, 1, 3)  # [d*H/G, n, G]
    cdef T * oa = mm(ctx, hp, g.ggml_reshape_3d(ctx, A.o_a, d * H // G, hp.o_lora, G), out, NULL)  # [Ro, n, G]
    oa = g.ggml_cont_2d(ctx, g.ggml_permute(ctx, oa, 0, 2, 1, 3), hp.o_lora * G, n)
    return named(mm(ctx, hp, A.o_b, oa, NULL), "attn_out", il)

# ------------------------------------------------------------------------------------------ mixture of experts


cdef T * mm_id(C * ctx, const Hparams * hp, T * w, T * x, T * sel, T ** prep) noexcept nogil:
    """ggml_mul_mat_id(w, x, sel), or for prompt processing on the CPU our K-quant product (kernels/dsv4_moe_gemm.c);
    *prep keeps x's quantization for the next product of the same x (prep may be NULL)."""
    cdef T * p
    if hp.gemm_isa != 0 and x.ne[2] >= hp.gemm_min_tokens and dsv4_moe_gemm_ok(w, x, sel):
        p = prep[0] if prep != NULL and prep[0] != NULL else dsv4_q8k_prep(ctx, x, hp.gemm_isa)
        if prep != NULL:
            prep[0] = p
        return dsv4_mul_mat_id_kq(ctx, w, p, sel, hp.gemm_isa)
    return g.ggml_mul_mat_id(ctx, w, x, sel)


cdef bint prefetch(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const MoeW * F, T * sel) noexcept nogil:
    """With hp.prefetch: a node that asks the kernel for the missing pages of the experts sel names, expanded into
    the graph now so that it runs as soon as sel is known (kernels/dsv4_prefetch.h). Whether one was built."""
    if hp.prefetch == NULL:
        return False
    cdef T * p = dsv4_moe_prefetch(ctx, sel, F.gate_exps, F.up_exps, F.down_exps, hp.prefetch)
    if p != NULL:
        g.ggml_build_forward_expand(gf, p)
    return p != NULL


cdef void prefetch_hash_layers(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const LayerW * lw, int l0, int l1,
                               Inputs * inp) noexcept nogil:
    """With hp.prefetch, at the start of a graph: hash-routed layers' experts depend on the tokens alone, so their
    pages are asked for before any layer computes."""
    cdef int il
    for il in range(l0, l1):
        if hp.prefetch != NULL and lw[il].ffn.hash:
            prefetch(ctx, gf, hp, &lw[il].ffn, g.ggml_get_rows(ctx, lw[il].ffn.tid2eid, inp.tokens))


cdef inline T * shared_expert(C * ctx, const Hparams * hp, const MoeW * F, T * f, Prep * prep) noexcept nogil:
    return mm(ctx, hp, F.down_sh, dsv4_swiglu_clamp(ctx, mm(ctx, hp, F.gate_sh, f, prep), mm(ctx, hp, F.up_sh, f, prep),
                                                    F.clamp_sh), NULL)


cdef T * experts(C * ctx, const Hparams * hp, T * gate, T * up, T * down, float clamp, T * xe, T * sel, T * w
                 ) noexcept nogil:
    """The picked experts' clamped SwiGLU outputs, each times its weight: [D, k, n] (sel: [k, n] ids into the
    [*, *, E] expert tensors; w: [1, k, n])."""
    cdef T * pe = NULL
    cdef T * h = dsv4_swiglu_clamp(ctx, mm_id(ctx, hp, gate, xe, sel, &pe), mm_id(ctx, hp, up, xe, sel, &pe), clamp)
    return g.ggml_mul(ctx, mm_id(ctx, hp, down, h, sel, NULL), w)


cdef inline T * routed(C * ctx, const Hparams * hp, const MoeW * F, T * xe, T * sel, T * w) noexcept nogil:
    return experts(ctx, hp, F.gate_exps, F.up_exps, F.down_exps, F.clamp_exp, xe, sel, w)


cdef T * routed_split(C * ctx, const Hparams * hp, const MoeW * F, T * xe, T * sel, T * w) noexcept nogil:
    """routed() with the layer's hot experts read from their copies on a device and the cold ones from the expert
    tensors (docs/moe-residency.md, "Hot experts on a device"): every pick runs once on each side, with its weight
    on one side and 0 on the other, and the two outputs are added pick by pick before the sum over the picks, so a
    run with both sides on the CPU computes exactly what routed() does."""
    cdef const HotW * H = &F.hot
    cdef int64_t k = sel.ne[0], n = sel.ne[1]
    cdef T * flat = g.ggml_reshape_1d(ctx, sel if g.ggml_is_contiguous(sel) else g.ggml_cont(ctx, sel), k * n)
    cdef T * w_hot = g.ggml_mul(ctx, w, g.ggml_reshape_3d(ctx, g.ggml_get_rows(ctx, H.is_hot, flat), 1, k, n))
    cdef T * out = experts(ctx, hp, H.gate, H.up, H.down, F.clamp_exp, xe,
                           g.ggml_reshape_2d(ctx, g.ggml_get_rows(ctx, H.slot, flat), k, n), w_hot)
    if H.all_hot:
        return out
    cdef T * cold = g.ggml_reshape_2d(ctx, g.ggml_get_rows(ctx, H.cold, flat), k, n)
    return g.ggml_add(ctx, out, routed(ctx, hp, F, xe, cold, g.ggml_sub(ctx, w, w_hot)))


cdef T * moe(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const MoeW * F, const UBatch * ub, Inputs * inp,
             T * f, int il) noexcept nogil:
    """docs/architecture.md §9: sqrt-softplus scores, biased top-k (or the token's hash row), normalised and scaled weights,
    clamped SwiGLU experts, plus the shared expert."""
    cdef int64_t n = f.ne[1], k = hp.n_used, D = hp.n_embd, i
    cdef Prep pf
    pf.q80 = pf.q8k = NULL
    cdef T * logits = mm(ctx, hp, F.gate_inp, f, &pf)
    if pf.q80 == NULL and pf.q8k == NULL:  # ggml's product (ours, which set pf, computes in f32)
        g.ggml_mul_mat_set_prec(logits, g.GGML_PREC_F32)
    cdef T * probs = g.ggml_sqrt(ctx, g.ggml_softplus(ctx, logits))  # [E, n]
    cdef T * sel
    if F.hash:
        sel = g.ggml_get_rows(ctx, F.tid2eid, inp.tokens)  # the token's row of the hash table
    else:
        sel = g.ggml_argsort_top_k(ctx, g.ggml_add(ctx, probs, F.probs_b), <int> k)  # bias for selection only
    cdef T * sh_out = NULL
    if not F.hash and prefetch(ctx, gf, hp, F, sel):  # the shared expert computes while the routed experts' pages come
        sh_out = shared_expert(ctx, hp, F, f, &pf)
        g.ggml_build_forward_expand(gf, sh_out)
    cdef T * r
    if ub.want_routes:  # a contiguous copy marked as an output: argsort_top_k's result is a strided view
        r = g.ggml_cont(ctx, sel)
        g.ggml_set_output(r)
        g.ggml_build_forward_expand(gf, r)
        inp.routes[il] = r
    cdef T * w = g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, probs, 1, hp.n_expert, n), sel)  # [1, k, n]
    cdef T * wsum
    if hp.w_norm:
        w = g.ggml_reshape_2d(ctx, w, k, n)
        wsum = g.ggml_clamp(ctx, g.ggml_sum_rows(ctx, w), 6.103515625e-5, INFINITY)
        w = g.ggml_reshape_3d(ctx, g.ggml_div(ctx, w, wsum), 1, k, n)
    if hp.w_scale != 1.0:
        w = g.ggml_scale(ctx, w, hp.w_scale)
    cdef T * xe = g.ggml_reshape_3d(ctx, f, D, 1, n)
    cdef T * down = routed(ctx, hp, F, xe, sel, w) if F.hot.gate == NULL else routed_split(ctx, hp, F, xe, sel, w)
    cdef T * y = g.ggml_view_2d(ctx, down, D, n, down.nb[2], 0)
    for i in range(1, k):  # in selection order, as the reference sums
        y = g.ggml_add(ctx, y, g.ggml_view_2d(ctx, down, D, n, down.nb[2], i * down.nb[1]))
    if sh_out == NULL:
        sh_out = shared_expert(ctx, hp, F, f, &pf)
    return g.ggml_add(ctx, y, sh_out)

# ------------------------------------------------------------------------------------------ the whole model


cdef T * block(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const LayerW * L, int il, const UBatch * ub,
               Inputs * inp, T * S) noexcept nogil:
    """One decoder block on the streams S [D, hc, n]: attention, then the MoE, each between its hyper-connection
    mixes (docs/architecture.md §6)."""
    cdef T * res = S
    cdef T * post
    cdef T * comb
    cdef T * a = norm(ctx, named(hc_pre(ctx, hp, &L.hc_attn, S, &post, &comb, il), "hc_attn_pre", il), L.attn.norm,
                      hp.eps)
    a = attention(ctx, gf, hp, &L.attn, il, ub, inp, named(a, "attn_norm", il))
    S = named(hc_post(ctx, hp, a, res, post, comb), "hc_attn_post", il)
    res = S
    a = norm(ctx, named(hc_pre(ctx, hp, &L.hc_ffn, S, &post, &comb, il), "hc_ffn_pre", il), L.ffn.norm, hp.eps)
    a = named(moe(ctx, gf, hp, &L.ffn, ub, inp, named(a, "ffn_norm", il), il), "ffn_out", il)
    return named(hc_post(ctx, hp, a, res, post, comb), "l_out", il)


cdef T * head(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const GlobalW * gw, T * out_norm, T * output,
              const UBatch * ub, Inputs * inp, T * S) noexcept nogil:
    """The final streams S [D, hc, n], exposed whole as inp.h_out [D*hc, n] when ub.want_h; their rows wanted (one
    sequence: its last n_out tokens; several: inp.out_rows) collapsed, normed and projected to logits
    [n_vocab, n_out]."""
    cdef int64_t n = S.ne[2], D = hp.n_embd, hc = hp.hc
    inp.h_out = NULL
    if ub.want_h:
        inp.h_out = g.ggml_cont_2d(ctx, S, D * hc, n)
        g.ggml_set_output(inp.h_out)
        g.ggml_build_forward_expand(gf, inp.h_out)
    if inp.out_rows != NULL:  # several sequences: the rows the host names
        if not g.ggml_is_contiguous(S):
            S = g.ggml_cont(ctx, S)
        S = g.ggml_reshape_3d(ctx, g.ggml_get_rows(ctx, g.ggml_reshape_2d(ctx, S, D * hc, n), inp.out_rows), D, hc,
                              ub.n_out)
    elif ub.n_out < n:
        S = g.ggml_cont(ctx, g.ggml_view_3d(ctx, S, D, hc, ub.n_out, S.nb[1], S.nb[2], (n - ub.n_out) * S.nb[2]))
    cdef T * y = named(norm(ctx, hc_head(ctx, hp, gw, S), out_norm, hp.eps), "result_norm", -1)
    cdef T * logits = named(mm(ctx, hp, output, y, NULL), "result_output", -1)
    g.ggml_set_output(logits)
    g.ggml_build_forward_expand(gf, logits)
    return logits


cdef void ubatch_inputs(C * ctx, const Hparams * hp, const LayerW * lw, int l0, int l1, const UBatch * ub,
                        Inputs * inp) noexcept nogil:
    """The graph inputs of a ubatch through layers l0 .. l1-1: tokens, positions, position mod ratio of the
    compressed kinds those layers have, each sequence's ring slots, masks, completed blocks and visible entries."""
    cdef int64_t n = ub.n
    cdef int il, c, s
    cdef bint has[N_COMP]
    has[COMP_CSA] = has[COMP_HCA] = False
    for il in range(l0, l1):
        if lw[il].attn.kind != SWA:
            has[comp_index(lw[il].attn.kind)] = True
    inp.tokens = input_1d(ctx, g.GGML_TYPE_I32, n)
    inp.pos = input_1d(ctx, g.GGML_TYPE_I32, n)
    for c in range(N_COMP):
        inp.ape[c] = input_1d(ctx, g.GGML_TYPE_I32, n) if has[c] else NULL
    cdef const SeqPlan * sp
    cdef const CompPlan * cp
    cdef SeqInputs * si
    for s in range(ub.n_seq):
        sp, si = &ub.seq[s], &inp.seq[s]
        si.raw_slot = input_1d(ctx, g.GGML_TYPE_I64, sp.n)
        si.raw_mask = input_2d(ctx, g.GGML_TYPE_F32, ub.ring, sp.n)
        for c in range(N_COMP):
            cp = &sp.comp[c]
            si.blk[c] = input_1d(ctx, g.GGML_TYPE_I32, cp.nb) if has[c] and cp.nb > 0 else NULL
            si.vis[c] = input_2d(ctx, g.GGML_TYPE_F32, cp.n_vis, sp.n) if has[c] and cp.n_vis > 0 else NULL
    inp.out_rows = input_1d(ctx, g.GGML_TYPE_I32, ub.n_out) if ub.n_seq > 1 and ub.n_out < n else NULL
    inp.h_in = NULL


cdef T * build_graph(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const GlobalW * gw, const LayerW * lw,
                     const UBatch * ub, Inputs * inp) noexcept nogil:
    """docs/architecture.md §6 for one ubatch of ub.n_seq sequences (docs/batching.md); returns the logits
    [n_vocab, n_out] of the rows wanted (one sequence: its last n_out tokens; several: inp.out_rows)."""
    cdef int64_t n = ub.n, D = hp.n_embd, hc = hp.hc
    cdef int il
    ubatch_inputs(ctx, hp, lw, 0, hp.n_layer, ub, inp)
    prefetch_hash_layers(ctx, gf, hp, lw, 0, hp.n_layer, inp)
    cdef T * x = g.ggml_get_rows(ctx, gw.tok_embd, inp.tokens)  # [D, n]
    cdef T * S = g.ggml_repeat_4d(ctx, g.ggml_reshape_3d(ctx, x, D, 1, n), D, hc, n, 1)  # hc identical streams
    for il in range(hp.n_layer):
        S = block(ctx, gf, hp, &lw[il], il, ub, inp, S)
    return head(ctx, gf, hp, gw, gw.out_norm, gw.output, ub, inp, S)


cdef T * build_mtp_graph(C * ctx, g.ggml_cgraph * gf, const Hparams * hp, const GlobalW * gw, const LayerW * lw,
                         const MtpW * mw, int il, const UBatch * ub, Inputs * inp) noexcept nogil:
    """The MTP (nextn) block il (docs/speculative.md) on the ubatch's rows: row t, at position p, reads the
    embedding of its token (the token at p + 1) and the streams inp.h_in[t] (the main model's final streams at p,
    or for a further draft the MTP's own), goes through the block with its own sliding window, and gives the
    logits of the token at p + 2 [n_vocab, n_out] (and with ub.want_h its streams, inp.h_out)."""
    cdef int64_t n = ub.n, D = hp.n_embd, hc = hp.hc
    ubatch_inputs(ctx, hp, lw, il, il + 1, ub, inp)
    prefetch_hash_layers(ctx, gf, hp, lw, il, il + 1, inp)
    inp.h_in = input_2d(ctx, g.GGML_TYPE_F32, D * hc, n)
    cdef T * e = g.ggml_get_rows(ctx, mw.embed if mw.embed != NULL else gw.tok_embd, inp.tokens)  # [D, n]
    e = named(norm(ctx, e, mw.enorm, hp.eps), "mtp_enorm", il)
    e = g.ggml_repeat_4d(ctx, g.ggml_reshape_3d(ctx, e, D, 1, n), D, hc, n, 1)
    cdef T * h = named(norm(ctx, g.ggml_reshape_3d(ctx, inp.h_in, D, hc, n), mw.hnorm, hp.eps), "mtp_hnorm", il)
    cdef T * S = named(g.ggml_mul_mat(ctx, mw.eh_proj, cat(ctx, hp, e, h, 0)), "mtp_eh_proj", il)  # [D, hc, n]
    S = block(ctx, gf, hp, &lw[il], il, ub, inp, S)
    return head(ctx, gf, hp, gw, mw.head_norm if mw.head_norm != NULL else gw.out_norm,
                mw.head if mw.head != NULL else gw.output, ub, inp, S)
