# cython: language_level=3, boundscheck=False, cdivision=True
"""A deepseek4 inference context: backends and scheduler, the per-sequence state (sliding-window ring,
compressed caches, compressor rows), ubatching and logits out (docs/architecture.md §11).

The context turns a ModelFile into the C structs of engine/graph.pxd once; per ubatch it plans the compressors
on the host (a few integers), builds the graph in C, fills its inputs from numpy and computes.
"""
import math

import numpy as np

cimport ggml as g
from dsv4_ops cimport dsv4_rope_params
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc

from .._ggml cimport Backends, WeightMap
from .graph cimport (COMP_CSA, COMP_HCA, CSA, HCA, N_COMP, CompInputs, CompPlan, GlobalW, Hparams, Inputs,
                    LayerState, LayerW, UBatch, build_graph)

from .. import _ggml
from ..model.tensors import global_tensors, layer_tensors
from .memory import bytes_per_token, ring_rows, state_bytes, state_tensors, window

_CACHE_TYPES = {"f32": g.GGML_TYPE_F32, "f16": g.GGML_TYPE_F16}


cdef inline double _now() noexcept:
    return g.ggml_time_us() * 1e-6


cdef g.c_bool _capture_cb(g.ggml_tensor * t, g.c_bool ask, void * user_data) noexcept with gil:
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
    cp.overlap = 1 if ratio == CSA else 0
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


# Where each weight goes: a tensor's `dest` (model/tensors.py) -> the byte offset of its field in LayerW or GlobalW.
cdef LayerW _lw_probe
cdef GlobalW _gw_probe


cdef size_t _off(void * field, void * base) noexcept:
    return <size_t> field - <size_t> base


_LAYER_FIELDS = {
    "hc_attn.fn": _off(&_lw_probe.hc_attn.fn, &_lw_probe),
    "hc_attn.base": _off(&_lw_probe.hc_attn.base, &_lw_probe),
    "hc_attn.scale": _off(&_lw_probe.hc_attn.scale, &_lw_probe),
    "attn.norm": _off(&_lw_probe.attn.norm, &_lw_probe),
    "attn.sinks": _off(&_lw_probe.attn.sinks, &_lw_probe),
    "attn.q_a": _off(&_lw_probe.attn.q_a, &_lw_probe),
    "attn.q_a_norm": _off(&_lw_probe.attn.q_a_norm, &_lw_probe),
    "attn.q_b": _off(&_lw_probe.attn.q_b, &_lw_probe),
    "attn.kv": _off(&_lw_probe.attn.kv, &_lw_probe),
    "attn.kv_norm": _off(&_lw_probe.attn.kv_norm, &_lw_probe),
    "attn.o_a": _off(&_lw_probe.attn.o_a, &_lw_probe),
    "attn.o_b": _off(&_lw_probe.attn.o_b, &_lw_probe),
    "attn.comp.kv": _off(&_lw_probe.attn.comp.kv, &_lw_probe),
    "attn.comp.gate": _off(&_lw_probe.attn.comp.gate, &_lw_probe),
    "attn.comp.ape": _off(&_lw_probe.attn.comp.ape, &_lw_probe),
    "attn.comp.norm": _off(&_lw_probe.attn.comp.norm, &_lw_probe),
    "attn.idx.proj": _off(&_lw_probe.attn.idx.proj, &_lw_probe),
    "attn.idx.q_b": _off(&_lw_probe.attn.idx.q_b, &_lw_probe),
    "attn.idx.comp.kv": _off(&_lw_probe.attn.idx.comp.kv, &_lw_probe),
    "attn.idx.comp.gate": _off(&_lw_probe.attn.idx.comp.gate, &_lw_probe),
    "attn.idx.comp.ape": _off(&_lw_probe.attn.idx.comp.ape, &_lw_probe),
    "attn.idx.comp.norm": _off(&_lw_probe.attn.idx.comp.norm, &_lw_probe),
    "hc_ffn.fn": _off(&_lw_probe.hc_ffn.fn, &_lw_probe),
    "hc_ffn.base": _off(&_lw_probe.hc_ffn.base, &_lw_probe),
    "hc_ffn.scale": _off(&_lw_probe.hc_ffn.scale, &_lw_probe),
    "ffn.norm": _off(&_lw_probe.ffn.norm, &_lw_probe),
    "ffn.gate_inp": _off(&_lw_probe.ffn.gate_inp, &_lw_probe),
    "ffn.tid2eid": _off(&_lw_probe.ffn.tid2eid, &_lw_probe),
    "ffn.probs_b": _off(&_lw_probe.ffn.probs_b, &_lw_probe),
    "ffn.gate_exps": _off(&_lw_probe.ffn.gate_exps, &_lw_probe),
    "ffn.up_exps": _off(&_lw_probe.ffn.up_exps, &_lw_probe),
    "ffn.down_exps": _off(&_lw_probe.ffn.down_exps, &_lw_probe),
    "ffn.gate_sh": _off(&_lw_probe.ffn.gate_sh, &_lw_probe),
    "ffn.up_sh": _off(&_lw_probe.ffn.up_sh, &_lw_probe),
    "ffn.down_sh": _off(&_lw_probe.ffn.down_sh, &_lw_probe),
}
_GLOBAL_FIELDS = {
    "tok_embd": _off(&_gw_probe.tok_embd, &_gw_probe),
    "out_norm": _off(&_gw_probe.out_norm, &_gw_probe),
    "output": _off(&_gw_probe.output, &_gw_probe),
    "hc_fn": _off(&_gw_probe.hc_fn, &_gw_probe),
    "hc_base": _off(&_gw_probe.hc_base, &_gw_probe),
    "hc_scale": _off(&_gw_probe.hc_scale, &_gw_probe),
}
cdef LayerState _st_probe
_STATE_FIELDS = {  # engine/memory.py's state tensor names -> LayerState fields
    "raw": _off(&_st_probe.raw, &_st_probe),
    "comp": _off(&_st_probe.comp, &_st_probe),
    "lid": _off(&_st_probe.lid, &_st_probe),
    "c.kv": _off(&_st_probe.c.kv, &_st_probe),
    "c.sc": _off(&_st_probe.c.sc, &_st_probe),
    "ic.kv": _off(&_st_probe.ic.kv, &_st_probe),
    "ic.sc": _off(&_st_probe.ic.sc, &_st_probe),
}


cdef inline void _bind(void * base, size_t offset, g.ggml_tensor * t) noexcept:
    (<g.ggml_tensor **> (<char *> base + offset))[0] = t


def binding_fields():
    """The weight and state destinations this engine binds (for tests: model/tensors.py and engine/memory.py must
    name exactly these)."""
    return frozenset(_LAYER_FIELDS), frozenset(_GLOBAL_FIELDS), frozenset(_STATE_FIELDS)


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
        for spec in global_tensors(p):
            _bind(&self.gw, _GLOBAL_FIELDS[spec.dest], w.get(spec.name))
        self.lw = <LayerW *> calloc(p.n_layer, sizeof(LayerW))
        if self.lw == NULL:
            raise MemoryError()
        cdef LayerW * L
        cdef dsv4_rope_params * rope
        for il in range(p.n_layer):
            L = &self.lw[il]
            L.attn.kind = p.kind(il)
            L.ffn.hash = p.is_hash_layer(il)
            L.ffn.clamp_exp, L.ffn.clamp_sh = p.clamp_exp(il), p.clamp_shexp(il)
            rope = &L.attn.rope
            (rope.n_ctx_orig, rope.freq_base, rope.freq_scale, rope.ext_factor, rope.attn_factor, rope.beta_fast,
             rope.beta_slow) = p.rope(il)
            for spec in layer_tensors(p, il):
                if spec.dest is not None:
                    _bind(L, _LAYER_FIELDS[spec.dest], w.get(spec.name))

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
        for spec in layout:
            t = g.ggml_new_tensor_2d(self.st_ctx, _CACHE_TYPES[spec.dtype], spec.ne[0], spec.ne[1])
            _bind(&self.st[spec.layer], _STATE_FIELDS[spec.name], t)
        self.overlap_init = [il for il in range(p.n_layer) if p.kind(il) == CSA]
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
            for kv_t, sc_t in ((<size_t> s.c.kv, <size_t> s.c.sc), (<size_t> s.ic.kv, <size_t> s.ic.sc)):
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
            for t in (<size_t> s.raw, <size_t> s.comp, <size_t> s.lid, <size_t> s.c.kv, <size_t> s.c.sc,
                      <size_t> s.ic.kv, <size_t> s.ic.sc):
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
        plan_compressor(&ub.comp[COMP_CSA], CSA, p0, n)
        plan_compressor(&ub.comp[COMP_HCA], HCA, p0, n)
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
        cdef int c
        for c in range(N_COMP):
            self._set_comp_inputs(&ub.comp[c], &inp.comp[c], pos)

    cdef _set_comp_inputs(self, const CompPlan * cp, const CompInputs * ci, pos):
        cdef int R = cp.ratio
        set_input(ci.ape, (pos % R).astype(np.int32))
        if ci.blk != NULL:
            set_input(ci.blk, ((cp.b0 + np.arange(cp.nb)) * R).astype(np.int32))
        if ci.vis != NULL:
            visible = np.arange(cp.n_vis)[None, :] < ((pos + 1) // R)[:, None]
            set_input(ci.vis, np.where(visible, 0.0, -np.inf).astype(np.float32))
