# cython: language_level=3, boundscheck=False, cdivision=True
"""A deepseek4 inference context: backends and scheduler, the per-sequence state (sliding-window ring,
compressed caches, compressor rows), ubatching and logits out (docs/architecture.md §11).

The context turns a ModelFile into the C structs of engine/graph.pxd once; per ubatch it plans the compressors
on the host (a few integers), builds the graph in C, fills its inputs from numpy and computes.
"""
import math

import numpy as np

cimport ggml as g
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc

from .._ggml cimport Backends, WeightMap
from .graph cimport CompPlan, GlobalW, Hparams, Inputs, LayerState, LayerW, UBatch, build_graph

from .. import _ggml
from .memory import bytes_per_token, ring_rows, state_bytes, state_tensors, window

_CACHE_TYPES = {"f32": g.GGML_TYPE_F32, "f16": g.GGML_TYPE_F16}


cdef inline double _now() noexcept:
    return g.ggml_time_us() * 1e-6


cdef bint _capture_cb(g.ggml_tensor * t, bint ask, void * user_data) noexcept with gil:
    """Debug captures: copy the F32 nodes whose names were asked for (see Context.capture)."""
    wanted = <dict> user_data
    name = t.name.decode(errors="replace")
    if ask:
        return name in wanted
    if name in wanted and t.type == g.GGML_TYPE_F32:
        shape = [t.ne[i] for i in range(4)][::-1]
        arr = np.empty(shape, np.float32)
        if g.ggml_is_contiguous(t):
            g.ggml_backend_tensor_get(t, <void *> (<size_t> arr.ctypes.data), 0, arr.nbytes)
            wanted[name] = arr
    return True


cdef void plan_compressor(CompPlan * cp, int ratio, int p0, int n) noexcept nogil:
    cdef int B0 = p0 // ratio * ratio
    cdef int B1 = (p0 + n) // ratio * ratio
    cp.ratio = ratio
    cp.overlap = 1 if ratio == 4 else 0
    cdef int s0 = B0 - ratio if cp.overlap else B0  # first position held by [state ; ubatch]
    cdef int s1 = B1 - ratio if cp.overlap else B1
    cp.l0 = p0 - s0
    cp.nb = (B1 - B0) // ratio
    cp.b0 = B0 // ratio
    cp.n_vis = (p0 + n) // ratio
    cp.keep_from = s1 - s0
    cp.l1 = p0 + n - s1


cdef void set_input(g.ggml_tensor * t, arr) except *:
    if t == NULL:
        return
    cdef const uint8_t[::1] b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    if <size_t> b.shape[0] != g.ggml_nbytes(t):
        raise RuntimeError(f"input {t.name.decode()}: {b.shape[0]} bytes for a {g.ggml_nbytes(t)}-byte tensor")
    g.ggml_backend_tensor_set(t, &b[0], 0, b.shape[0])


cdef class Context:
    """One sequence of one model: feed tokens with eval(), read logits; reset() starts over.

    n_ctx bounds the positions (the compressed caches are sized for it); n_ubatch is the largest number of tokens
    computed in one graph; type_k is the cache type ("f16" as llama.cpp's default, or "f32"); flash_attn=True
    computes attention as llama.cpp's flash-attention path does (keys and values rounded to f16), False in f32
    throughout (with type_k="f32": exact up to summation order).
    """
    cdef Backends be
    cdef WeightMap wm
    cdef object model
    cdef readonly object params
    cdef Hparams hp
    cdef GlobalW gw
    cdef LayerW * lw
    cdef LayerState * st
    cdef g.ggml_context * st_ctx
    cdef g.ggml_backend_buffer_t st_buf
    cdef g.ggml_backend_sched_t sched
    cdef void * arena
    cdef size_t arena_size
    cdef size_t graph_size
    cdef readonly int n_ctx, n_ubatch, ring, n_past
    cdef readonly int last_graph_nodes
    cdef readonly size_t last_graph_mem
    cdef readonly str type_k
    cdef object slot_pos
    cdef object overlap_init
    cdef dict _capture
    cdef g.ggml_tensor ** routes
    cdef public object route_sink
    cdef public double t_graph, t_inputs, t_compute  # seconds: graph build + allocation (C), inputs, compute

    def __cinit__(self, model, int n_ctx, int n_ubatch=512, str type_k="f16", Backends backends=None,
                  bint flash_attn=True, params=None, str gemm="auto", int gemm_min_tokens=8):
        p = params if params is not None else model.params
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_ubatch <= 0:
            raise ValueError(f"n_ubatch must be positive, got {n_ubatch}")
        if type_k not in _CACHE_TYPES:
            raise ValueError(f"type_k must be one of {sorted(_CACHE_TYPES)}, got {type_k!r}")
        self.model = model
        self.params = p
        self.n_ctx, self.n_ubatch, self.type_k = n_ctx, min(n_ubatch, n_ctx), type_k
        self.be = backends if backends is not None else Backends("auto")
        self.wm = model.weights(self.be)
        self.ring = ring_rows(p, n_ctx, self.n_ubatch)
        self._fill_params(p)
        self.hp.window = window(p, n_ctx)
        self.hp.attn_f16 = flash_attn
        # our CPU custom ops (kernels/dsv4_gemm.h, dsv4_hc.h) read every tensor in host memory: CPU-only backend sets
        self.hp.cpu_only = self.be.n == 1
        self.hp.gemm_isa = _ggml.gemm_isa(gemm) if self.hp.cpu_only else 0
        self.hp.gemm_min_tokens = max(gemm_min_tokens, 1)
        self._alloc_state(p)
        self.routes = <g.ggml_tensor **> calloc(p.n_layer, sizeof(g.ggml_tensor *))
        if self.routes == NULL:
            raise MemoryError()
        self.route_sink = None
        self.graph_size = 512 * p.n_layer + 1024
        self.arena_size = self.graph_size * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(self.graph_size, False)
        self.arena = malloc(self.arena_size)
        if self.arena == NULL:
            raise MemoryError()
        self.sched = g.ggml_backend_sched_new(self.be.backends, NULL, self.be.n, self.graph_size, False, True)
        if self.sched == NULL:
            raise RuntimeError("ggml could not create a scheduler")
        self.reset()

    def __dealloc__(self):
        if self.sched != NULL:
            g.ggml_backend_sched_free(self.sched)
        if self.st_buf != NULL:
            g.ggml_backend_buffer_free(self.st_buf)
        if self.st_ctx != NULL:
            g.ggml_free(self.st_ctx)
        free(self.lw)
        free(self.st)
        free(self.routes)
        free(self.arena)

    # ---------------------------------------------------------------------------------------------- setup

    cdef _fill_params(self, p):
        cdef Hparams * hp = &self.hp
        hp.n_embd, hp.n_layer, hp.n_head, hp.head_dim = p.n_embd, p.n_layer, p.n_head, p.head_dim
        hp.rope_dim, hp.o_groups, hp.o_lora = p.rope_dim, p.o_group_count, p.o_lora_rank
        hp.hc, hp.hc_iters, hp.hc_eps, hp.eps = p.hc_mult, p.hc_sinkhorn_iters, p.hc_eps, p.norm_eps
        hp.n_expert, hp.n_used, hp.w_norm, hp.w_scale = p.n_expert, p.n_expert_used, p.expert_weights_norm, p.expert_weights_scale
        hp.idx_heads, hp.idx_dim, hp.idx_topk, hp.n_vocab = p.indexer_n_head, p.indexer_head_dim, p.indexer_top_k, p.n_vocab
        w = self.wm
        self.gw.tok_embd = w.get("token_embd.weight")
        self.gw.out_norm = w.get("output_norm.weight")
        self.gw.output = w.get("output.weight")
        self.gw.hc_fn = w.get("output_hc_fn.weight")
        self.gw.hc_base = w.get("output_hc_base.weight")
        self.gw.hc_scale = w.get("output_hc_scale.weight")
        self.lw = <LayerW *> calloc(p.n_layer, sizeof(LayerW))
        if self.lw == NULL:
            raise MemoryError()
        cdef LayerW * L
        for il in range(p.n_layer):
            L = &self.lw[il]
            b = f"blk.{il}."
            L.ratio = p.ratio(il)
            L.hash = p.is_hash_layer(il)
            L.clamp_exp, L.clamp_sh = p.clamp_exp(il), p.clamp_shexp(il)
            if L.ratio == 0:  # one rotary parameter set per layer (docs/architecture.md §5.4)
                L.rope.n_ctx_orig, L.rope.freq_base, L.rope.freq_scale = 0, p.rope_freq_base, 1.0
                L.rope.ext_factor, L.rope.attn_factor, L.rope.beta_fast, L.rope.beta_slow = 0.0, 1.0, 0.0, 0.0
            else:
                fs = 1.0 / p.rope_scaling_factor
                ef = 1.0 if p.rope_scaling_type == "yarn" else 0.0
                L.rope.n_ctx_orig, L.rope.freq_base, L.rope.freq_scale = p.rope_orig_ctx, p.compress_rope_freq_base, fs
                L.rope.ext_factor = ef
                L.rope.attn_factor = 1.0 / (1.0 + 0.1 * math.log(1.0 / fs)) if ef else 1.0
                L.rope.beta_fast, L.rope.beta_slow = p.yarn_beta_fast, p.yarn_beta_slow
            L.attn_norm = w.get(b + "attn_norm.weight")
            L.sinks = w.get(b + "attn_sinks.weight")
            L.q_a = w.get(b + "attn_q_a.weight")
            L.q_a_norm = w.get(b + "attn_q_a_norm.weight")
            L.q_b = w.get(b + "attn_q_b.weight")
            L.kv = w.get(b + "attn_kv.weight")
            L.kv_norm = w.get(b + "attn_kv_a_norm.weight")
            L.o_a = w.get(b + "attn_output_a.weight")
            L.o_b = w.get(b + "attn_output_b.weight")
            L.hc_attn_fn = w.get(b + "hc_attn_fn.weight")
            L.hc_attn_base = w.get(b + "hc_attn_base.weight")
            L.hc_attn_scale = w.get(b + "hc_attn_scale.weight")
            L.hc_ffn_fn = w.get(b + "hc_ffn_fn.weight")
            L.hc_ffn_base = w.get(b + "hc_ffn_base.weight")
            L.hc_ffn_scale = w.get(b + "hc_ffn_scale.weight")
            L.gate_inp = w.get(b + "ffn_gate_inp.weight")
            L.probs_b = NULL if L.hash else w.get(b + "exp_probs_b.bias")
            L.tid2eid = w.get(b + "ffn_gate_tid2eid.weight") if L.hash else NULL
            L.ffn_norm = w.get(b + "ffn_norm.weight")
            L.gate_exps = w.get(b + "ffn_gate_exps.weight")
            L.up_exps = w.get(b + "ffn_up_exps.weight")
            L.down_exps = w.get(b + "ffn_down_exps.weight")
            L.gate_sh = w.get(b + "ffn_gate_shexp.weight")
            L.up_sh = w.get(b + "ffn_up_shexp.weight")
            L.down_sh = w.get(b + "ffn_down_shexp.weight")
            if L.ratio:
                L.c_kv = w.get(b + "attn_compressor_kv.weight")
                L.c_gate = w.get(b + "attn_compressor_gate.weight")
                L.c_ape = w.get(b + "attn_compressor_ape.weight")
                L.c_norm = w.get(b + "attn_compressor_norm.weight")
            if L.ratio == 4:
                L.i_proj = w.get(b + "indexer.proj.weight")
                L.i_q_b = w.get(b + "indexer.attn_q_b.weight")
                L.i_kv = w.get(b + "indexer_compressor_kv.weight")
                L.i_gate = w.get(b + "indexer_compressor_gate.weight")
                L.i_ape = w.get(b + "indexer_compressor_ape.weight")
                L.i_norm = w.get(b + "indexer_compressor_norm.weight")

    cdef _alloc_state(self, p):
        layout = state_tensors(p, self.n_ctx, self.n_ubatch, self.type_k)
        cdef g.ggml_init_params ip
        ip.mem_size = (len(layout) + 1) * g.ggml_tensor_overhead()
        ip.mem_buffer = NULL
        ip.no_alloc = True
        self.st_ctx = g.ggml_init(ip)
        self.st = <LayerState *> calloc(p.n_layer, sizeof(LayerState))
        if self.st_ctx == NULL or self.st == NULL:
            raise MemoryError()
        cdef g.ggml_tensor * t
        cdef LayerState * s
        for spec in layout:
            t = g.ggml_new_tensor_2d(self.st_ctx, _CACHE_TYPES[spec.dtype], spec.ne[0], spec.ne[1])
            s = &self.st[spec.layer]
            if spec.name == "raw":
                s.raw = t
            elif spec.name == "comp":
                s.comp = t
            elif spec.name == "lid":
                s.lid = t
            elif spec.name == "st_kv":
                s.st_kv = t
            elif spec.name == "st_sc":
                s.st_sc = t
            elif spec.name == "ist_kv":
                s.ist_kv = t
            elif spec.name == "ist_sc":
                s.ist_sc = t
        self.overlap_init = [il for il in range(p.n_layer) if p.ratio(il) == 4]
        cdef g.ggml_backend_buffer_type_t buft = g.ggml_backend_dev_buffer_type(self.be.primary_dev())
        self.st_buf = g.ggml_backend_alloc_ctx_tensors_from_buft(self.st_ctx, buft)
        if self.st_buf == NULL:
            raise MemoryError(f"could not allocate {state_bytes(p, self.n_ctx, self.n_ubatch, self.type_k)} bytes of "
                              f"context state for n_ctx={self.n_ctx}")
        g.ggml_backend_buffer_clear(self.st_buf, 0)  # finite everywhere: masked slots must not hold NaNs

    # ---------------------------------------------------------------------------------------------- state

    @property
    def state_bytes(self) -> int:
        """Bytes of the per-sequence state (caches and compressor rows) this context allocated."""
        return g.ggml_backend_buffer_get_size(self.st_buf)

    def bytes_per_token(self) -> float:
        """The state bytes that grow with n_ctx, per token of context (the compressed caches)."""
        return bytes_per_token(self.params, self.type_k)

    def weight_range(self, str name):
        """(address, nbytes) of a weight tensor's data in host memory (the mapped file, or memory the weights were
        read into), or None on a device."""
        return self.wm.host_range(name)

    @property
    def backends(self):
        return self.be

    def reset(self):
        """Forget the sequence: position 0, empty window, the compressors' virtual block before position 0."""
        self.n_past = 0
        self.slot_pos = np.full(self.ring, -(1 << 40), np.int64)
        cdef LayerState * s
        for il in self.overlap_init:  # overlapping compressors read a block "before" block 0: value 0, score -inf
            s = &self.st[il]
            for kv_t, sc_t in ((<size_t> s.st_kv, <size_t> s.st_sc), (<size_t> s.ist_kv, <size_t> s.ist_sc)):
                width = (<g.ggml_tensor *> kv_t).ne[0]
                set_input(<g.ggml_tensor *> kv_t, np.zeros((8, width), np.float32))
                sc = np.zeros((8, width), np.float32)
                sc[:4] = -np.inf
                set_input(<g.ggml_tensor *> sc_t, sc)

    _STATE_MAGIC = b"DSV4CTX1"

    def save_state(self) -> bytes:
        """The whole sequence state (position, window slots, every cache and compressor row) as bytes."""
        parts = [self._STATE_MAGIC, np.array([self.n_past, self.ring, self.hp.n_layer], np.int64).tobytes(),
                 np.asarray(self.slot_pos, np.int64).tobytes()]
        cdef g.ggml_tensor * t
        for t_addr in self._state_tensors():
            t = <g.ggml_tensor *> <size_t> t_addr
            buf = np.empty(g.ggml_nbytes(t), np.uint8)
            g.ggml_backend_tensor_get(t, <void *> (<size_t> buf.ctypes.data), 0, buf.nbytes)
            parts.append(buf.tobytes())
        return b"".join(parts)

    def check_state(self, data) -> int:
        """The number of positions a save_state() blob holds; ValueError, naming the sizes, unless it is a state of
        a context like this one (same model, n_ctx, n_ubatch and type_k). Reads the blob, changes nothing."""
        want = len(self._STATE_MAGIC) + 24 + 8 * self.ring
        for t_addr in self._state_tensors():
            want += g.ggml_nbytes(<g.ggml_tensor *> <size_t> t_addr)
        view = memoryview(data).cast("B")
        if len(view) != want or bytes(view[: len(self._STATE_MAGIC)]) != self._STATE_MAGIC:
            raise ValueError(
                f"not a state of this context: {len(view)} bytes, a state of this context has {want} (different "
                "model, n_ctx, n_ubatch or cache type)")
        n_past, ring, n_layer = np.frombuffer(view, np.int64, 3, len(self._STATE_MAGIC)).tolist()
        if ring != self.ring or n_layer != self.hp.n_layer or not 0 <= n_past <= self.n_ctx:
            raise ValueError(
                f"not a state of this context: {n_past} positions, window of {ring}, {n_layer} layers; this context "
                f"has {self.n_ctx} positions, a window of {self.ring}, {self.hp.n_layer} layers")
        return n_past

    def load_state(self, data) -> None:
        """Restore a state from save_state() of a context with the same model, n_ctx, n_ubatch and type_k; nothing
        changes when `data` is not one (check_state)."""
        n_past = self.check_state(data)
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef size_t off = len(self._STATE_MAGIC) + 24 + 8 * self.ring
        cdef g.ggml_tensor * t
        slot_pos = np.frombuffer(view, np.int64, self.ring, len(self._STATE_MAGIC) + 24).copy()
        for t_addr in self._state_tensors():
            t = <g.ggml_tensor *> <size_t> t_addr
            size = g.ggml_nbytes(t)
            g.ggml_backend_tensor_set(t, &view[off], 0, size)
            off += size
        self.n_past = n_past
        self.slot_pos = slot_pos

    def _state_tensors(self):
        out = []
        cdef LayerState * s
        for il in range(self.hp.n_layer):
            s = &self.st[il]
            for t in (<size_t> s.raw, <size_t> s.comp, <size_t> s.lid, <size_t> s.st_kv, <size_t> s.st_sc,
                      <size_t> s.ist_kv, <size_t> s.ist_sc):
                if t:
                    out.append(t)
        return out

    # ---------------------------------------------------------------------------------------------- compute

    def capture(self, names):
        """Debugging: during the next eval(), copy the named graph nodes ("q-0", "attn_raw-3", "l_out-5",
        "result_norm", ... as llama.cpp names them) into the dict this returns. Slow: computes node by node."""
        self._capture = {n: None for n in names}
        g.ggml_backend_sched_set_eval_callback(self.sched, _capture_cb, <void *> self._capture)
        return self._capture

    def eval(self, tokens, bint all_logits=False):
        """Append `tokens` (int ids) to the sequence; returns float32 logits [n_tokens, n_vocab] (all_logits) or
        [1, n_vocab] for the last token. Tokens are computed in ubatches of at most n_ubatch."""
        toks = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0:
            raise ValueError("eval needs at least one token")
        if toks.min() < 0 or toks.max() >= self.hp.n_vocab:
            bad = toks[(toks < 0) | (toks >= self.hp.n_vocab)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.hp.n_vocab})")
        if self.n_past + n > self.n_ctx:
            raise ValueError(f"{self.n_past} + {n} tokens exceed the context of {self.n_ctx} tokens")
        out = []
        for s in range(0, n, self.n_ubatch):
            chunk = toks[s : s + self.n_ubatch]
            last = s + self.n_ubatch >= n
            n_out = chunk.shape[0] if all_logits else (1 if last else 0)
            res = self._ubatch(chunk.astype(np.int32), n_out)
            if res is not None:
                out.append(res)
        if self._capture is not None:
            g.ggml_backend_sched_set_eval_callback(self.sched, NULL, NULL)
            self._capture = None
        return np.concatenate(out) if len(out) > 1 else out[0]

    cdef _ubatch(self, toks, int n_out):
        cdef UBatch ub
        cdef int n = toks.shape[0], p0 = self.n_past
        ub.n, ub.p0, ub.ring = n, p0, self.ring
        ub.n_out = n_out if n_out > 0 else 1
        sink = self.route_sink
        ub.want_routes = sink is not None
        plan_compressor(&ub.c4, 4, p0, n)
        plan_compressor(&ub.c128, 128, p0, n)
        cdef g.ggml_init_params ip
        ip.mem_size = self.arena_size
        ip.mem_buffer = self.arena
        ip.no_alloc = True
        cdef g.ggml_context * ctx = g.ggml_init(ip)
        if ctx == NULL:
            raise MemoryError()
        cdef Inputs inp
        inp.routes = self.routes
        cdef g.ggml_cgraph * gf
        cdef g.ggml_tensor * logits
        cdef g.ggml_status status
        cdef double t0 = _now()
        try:
            gf = g.ggml_new_graph_custom(ctx, self.graph_size, False)
            with nogil:
                logits = build_graph(ctx, gf, &self.hp, &self.gw, self.lw, self.st, &ub, &inp)
            self.last_graph_nodes = g.ggml_graph_n_nodes(gf)
            self.last_graph_mem = g.ggml_used_mem(ctx)
            g.ggml_backend_sched_reset(self.sched)
            if not g.ggml_backend_sched_alloc_graph(self.sched, gf):
                raise MemoryError("ggml could not allocate the compute graph")
            ti = _now()
            self._set_inputs(&ub, &inp, toks)
            t1 = _now()
            self.t_graph += ti - t0
            self.t_inputs += t1 - ti
            with nogil:
                status = g.ggml_backend_sched_graph_compute(self.sched, gf)
            self.t_compute += _now() - t1
            if status != g.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"graph compute failed (status {<int> status})")
            self.n_past += n
            if ub.want_routes:
                sink(self._routes(n), toks)
            if n_out == 0:
                return None
            res = np.empty((ub.n_out, self.hp.n_vocab), np.float32)
            g.ggml_backend_tensor_get(logits, <void *> (<size_t> res.ctypes.data), 0, res.nbytes)
            return res
        finally:
            g.ggml_free(ctx)

    cdef _routes(self, int n):
        """The experts of every (layer, token) of the ubatch just computed: int32 [n_layer, n, n_expert_used]."""
        cdef int k = self.hp.n_used
        out = np.empty((self.hp.n_layer, n, k), np.int32)
        cdef size_t row = <size_t> n * k * sizeof(int)
        cdef size_t base = out.ctypes.data
        cdef int il
        for il in range(self.hp.n_layer):
            if self.routes[il] == NULL or g.ggml_nbytes(self.routes[il]) != row:
                raise RuntimeError(f"layer {il}: no routing output in the graph")
            g.ggml_backend_tensor_get(self.routes[il], <void *> (base + il * row), 0, row)
        return out

    cdef _set_inputs(self, const UBatch * ub, Inputs * inp, toks):
        cdef int n = ub.n, p0 = ub.p0
        pos = np.arange(p0, p0 + n, dtype=np.int64)
        set_input(inp.tokens, toks)
        set_input(inp.pos, pos.astype(np.int32))
        slots = pos % self.ring
        set_input(inp.raw_slot, slots)
        self.slot_pos[slots] = pos
        sp = self.slot_pos[None, :]
        vis = (sp <= pos[:, None]) & (sp > pos[:, None] - self.hp.window)
        set_input(inp.raw_mask, np.where(vis, 0.0, -np.inf).astype(np.float32))  # [n, ring]
        self._set_comp_inputs(&ub.c4, inp.ape4, inp.blk4, inp.vis4, pos)
        self._set_comp_inputs(&ub.c128, inp.ape128, inp.blk128, inp.vis128, pos)

    cdef _set_comp_inputs(self, const CompPlan * cp, g.ggml_tensor * ape, g.ggml_tensor * blk, g.ggml_tensor * vis,
                          pos):
        cdef int R = cp.ratio
        set_input(ape, (pos % R).astype(np.int32))
        if blk != NULL:
            set_input(blk, ((cp.b0 + np.arange(cp.nb)) * R).astype(np.int32))
        if vis != NULL:
            visible = np.arange(cp.n_vis)[None, :] < ((pos + 1) // R)[:, None]
            set_input(vis, np.where(visible, 0.0, -np.inf).astype(np.float32))
