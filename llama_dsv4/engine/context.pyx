# cython: language_level=3, boundscheck=False, cdivision=True
"""A deepseek4 inference context: backends and scheduler, the per-sequence state (sliding-window ring,
compressed caches, compressor rows) of one or several sequences, ubatching and logits out (docs/architecture.md
§11, docs/batching.md).

The context turns a ModelFile into the C structs of engine/graph.pxd once; per ubatch it plans each sequence's
compressors on the host (a few integers), builds the graph in C, fills its inputs from numpy and computes.
"""
import operator

import numpy as np

cimport ggml as g
from dsv4_ops cimport dsv4_prefetch_stats, dsv4_rope_params
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, strstr

from .._ggml cimport Backends, DeviceTensors, WeightMap
from .graph cimport (COMP_CSA, COMP_HCA, CSA, HCA, MAX_SEQ, N_COMP, SWA, CompPlan, GlobalW, Hparams, HotW,
                    Inputs, LayerState, LayerW, MtpW, SeqInputs, SeqPlan, UBatch, build_graph, build_mtp_graph)

from .. import _ggml
from ..model.tensors import global_tensors, layer_tensors, optional_nextn_tensors
from .device_limits import check_device_limits
from .hot_experts import HotExperts
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


cdef int first_kept_row(int ratio, int cut) noexcept nogil:
    """The first position whose compressor rows a sequence holding `cut` positions keeps (s1 of §11.2): the start of
    the block holding position cut, one block earlier for ratio 4 (its next entry reads the previous block)."""
    cdef int B = cut // ratio * ratio
    return B - ratio if ratio == CSA else B


cdef int backup_start(int ratio, int p0, int n, int keep_back) noexcept nogil:
    """The first position whose compressor rows the backup of a ubatch p0 .. p0+n-1 holds: those a truncation to
    any position from p0 + n - keep_back (at least p0) on needs (first_kept_row of that position)."""
    cdef int x = p0 + n - keep_back
    if x < p0:
        x = p0
    return first_kept_row(ratio, x)


cdef void plan_compressor(CompPlan * cp, int ratio, int p0, int n, int keep_back) noexcept nogil:
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
    cp.bk_row = 2 * ratio if cp.overlap else ratio  # the backup rows follow the state's own (engine/memory.py)
    cp.nbk = cp.bk_from = 0
    cdef int lo
    if keep_back > 0:
        lo = backup_start(ratio, p0, n, keep_back)
        if lo < s1:
            cp.nbk, cp.bk_from = s1 - lo, lo - s0


cdef void plan_rebuild(CompPlan * cp, int ratio, int p0, int n, int cut) noexcept nogil:
    """A ubatch p0 .. p0+n-1 re-evaluated after a truncation to `cut` (p0 + n <= cut, Context.truncate): every
    block that completes before cut has its exact entry in the cache already, so nothing is pooled; the rows are
    only kept, from first_kept_row(cut) on. The state holds rows from min(T, p0) on (T = first_kept_row: for a kind
    whose rows before the rebuild start survived, T; for the others the state starts empty at the rebuild start)."""
    cdef int T = first_kept_row(ratio, cut)
    cdef int s0 = T if T < p0 else p0
    cdef int s1 = T if T < p0 + n else p0 + n
    cp.ratio = ratio
    cp.overlap = 1 if ratio == CSA else 0
    cp.l0 = p0 - s0
    cp.nb = 0
    cp.b0 = (p0 + n) // ratio
    cp.n_vis = (p0 + n) // ratio
    cp.keep_from = s1 - s0
    cp.l1 = p0 + n - s1
    cp.nbk = cp.bk_from = cp.bk_row = 0


cdef void set_rows(g.ggml_tensor * t, arr) except *:
    """Write the first rows of a state tensor (float32 [rows, ne0], at most its rows)."""
    cdef const uint8_t[::1] b = np.ascontiguousarray(arr, np.float32).view(np.uint8).reshape(-1)
    if <size_t> b.shape[0] > g.ggml_nbytes(t):
        raise RuntimeError(f"{b.shape[0]} bytes for a {g.ggml_nbytes(t)}-byte tensor")
    g.ggml_backend_tensor_set(t, &b[0], 0, b.shape[0])


cdef void set_input(g.ggml_tensor * t, arr) except *:
    if t == NULL or t.buffer == NULL:  # absent, or no node reads it (a rebuild ubatch that keeps no rows of a kind)
        return
    cdef const uint8_t[::1] b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    if <size_t> b.shape[0] != g.ggml_nbytes(t):
        raise RuntimeError(f"input {t.name.decode()}: {b.shape[0]} bytes for a {g.ggml_nbytes(t)}-byte tensor")
    g.ggml_backend_tensor_set(t, &b[0], 0, b.shape[0])


# Where each weight goes: a tensor's `dest` (model/tensors.py) -> the byte offset of its field in LayerW or GlobalW.
cdef LayerW _lw_probe
cdef GlobalW _gw_probe
cdef MtpW _mw_probe


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
_MTP_FIELDS = {
    "mtp.eh_proj": _off(&_mw_probe.eh_proj, &_mw_probe),
    "mtp.enorm": _off(&_mw_probe.enorm, &_mw_probe),
    "mtp.hnorm": _off(&_mw_probe.hnorm, &_mw_probe),
    "mtp.embed": _off(&_mw_probe.embed, &_mw_probe),
    "mtp.head": _off(&_mw_probe.head, &_mw_probe),
    "mtp.head_norm": _off(&_mw_probe.head_norm, &_mw_probe),
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
    name exactly these): a layer's, the globals, the state's, the MTP block's own."""
    return frozenset(_LAYER_FIELDS), frozenset(_GLOBAL_FIELDS), frozenset(_STATE_FIELDS), frozenset(_MTP_FIELDS)


# Graph tensors per layer: a single-sequence ubatch takes at most about 512 (with room), each further sequence of a
# mixed ubatch adds its per-sequence part (ring write, compressors, indexer, attention: docs/batching.md), about 75
# tensors (measured: tests/test_multiseq.py checks the room left).
_NODES_PER_LAYER, _SEQ_NODES_PER_LAYER = 512, 160
# ggml_backend_sched_new's buffers per graph tensor: one split per node, 2 x 30 split inputs each (a tensor struct
# and four int ids per input)
_SCHED_BYTES_PER_TENSOR = 60 * (sizeof(g.ggml_tensor) + 16)


cdef class Context:
    """One or several sequences (n_seq) of one model: feed a sequence tokens with eval(), several sequences at once
    with eval_batch(), read logits; reset() starts a sequence over.

    n_ctx bounds the positions of each sequence (its compressed caches are sized for it); n_ubatch is the largest
    number of tokens computed in one graph; type_k is the cache type ("f16" as llama.cpp's default, or "f32");
    flash_attn=True computes attention as llama.cpp's flash-attention path does (keys and values rounded to f16),
    False in f32 throughout (with type_k="f32": exact up to summation order). Sequences are numbered 0 .. n_seq-1;
    the methods that take a seq_id default to sequence 0. hot_experts=H: each MoE layer's H hot experts copied into
    the local device's memory (experts 0 ... H-1 until `hot_experts.assign` says otherwise), the rest computed by
    the CPU from the mapping (engine/hot_experts.py); with a GPU, the experts' tensors stay in host memory and the
    other weights go to the GPU.
    """
    cdef Backends be
    cdef WeightMap wm
    cdef object model
    cdef readonly object params
    cdef Hparams hp
    cdef GlobalW gw
    cdef LayerW * lw             # [n_blocks]: the layers, then the MTP block when the context runs it
    cdef MtpW mw
    cdef readonly int n_blocks   # n_layer, + 1 with mtp
    cdef LayerState * st         # [n_seq * n_blocks]: sequence s's layers from st + s * n_blocks
    cdef SeqPlan * plans         # [n_seq]: a ubatch's per-sequence plans
    cdef SeqInputs * seq_inputs  # [n_seq]: ... and graph inputs
    cdef g.ggml_context ** st_ctx         # the state's tensors, one context per backend that holds layers
    cdef g.ggml_backend_buffer_t * st_buf  # and their memory on that backend
    cdef int n_st                          # entries of both (the backends)
    cdef g.ggml_backend_sched_t sched
    cdef void * arena
    cdef size_t arena_size
    cdef readonly size_t graph_size  # graph tensors the arena and the scheduler have room for
    cdef readonly int n_ctx, n_ubatch, ring, n_seq
    cdef readonly int last_graph_nodes, last_graph_tensors
    cdef readonly int last_graph_splits  # the scheduler's splits of the last graph (one per change of backend)
    cdef readonly tuple last_node_backends  # with more than one backend: the last graph's nodes on each backend
    cdef readonly size_t last_graph_mem
    cdef readonly str type_k
    cdef list past               # per sequence: positions held
    cdef list slot_pos           # per sequence: the position each ring slot holds
    cdef readonly int keep_back  # truncations by up to this many positions need no evaluation again (backup rows)
    cdef list backup             # per sequence: (positions held, {ratio: first position of the backup rows}) or None
    cdef list mtp_past           # per sequence: positions the MTP block has read (mtp)
    cdef list mtp_slot_pos       # per sequence: the position each slot of the MTP block's ring holds (mtp)
    cdef readonly object last_h  # mtp: float32 [rows, D*hc], the final streams of the last eval's logits rows
    cdef object overlap_init
    cdef object hot              # HotExperts, or None (hot_experts)
    cdef readonly object layer_dev  # split across RPC devices: the backend index of each layer; else None
    cdef tuple comp_ratios       # the compressed kinds the model's layers have (4, 128)
    cdef dict _capture
    cdef g.ggml_tensor ** routes
    cdef public object route_sink
    cdef public double t_graph, t_inputs, t_compute  # seconds: graph build + allocation (C), inputs, compute
    # the MTP block's one-row graph, built and allocated once and run again for each further draft (its shapes do not
    # depend on the position: a sliding window only); mtp_key = 2 * seq_id + want_h of the graph held, -1 none
    cdef g.ggml_backend_sched_t mtp_sched
    cdef void * mtp_arena
    cdef g.ggml_context * mtp_gctx
    cdef g.ggml_cgraph * mtp_gf
    cdef g.ggml_tensor * mtp_logits
    cdef Inputs mtp_inp
    cdef SeqInputs mtp_si
    cdef int mtp_key
    cdef readonly int mtp_graph_builds  # one-row MTP graphs built (the rest of the one-row steps reused one)
    cdef public bint hold_mtp_graph     # False: every MTP step builds its graph afresh (for benchmarks)
    cdef dsv4_prefetch_stats pf_stats   # kernels/dsv4_prefetch.h's counters (moe_prefetch)

    def __cinit__(self, model, int n_ctx, int n_ubatch=512, str type_k="f16", Backends backends=None,
                  bint flash_attn=True, params=None, str gemm="auto", int gemm_min_tokens=8, int n_seq=1,
                  bint mtp=False, int keep_back=0, int hot_experts=0):
        p = params if params is not None else model.params
        if mtp and p.n_nextn < 1:
            raise ValueError("this model has no MTP (nextn) layer (blk.N.nextn.* tensors with nextn_predict_layers "
                             ">= 1): speculative decoding with MTP needs a file that holds it")
        if mtp and p.kind(p.n_layer) != SWA:
            raise ValueError(f"the MTP layer has compressed attention (ratio {int(p.kind(p.n_layer))}): only a "
                             "sliding-window MTP layer is supported, as in llama.cpp")
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_ubatch <= 0:
            raise ValueError(f"n_ubatch must be positive, got {n_ubatch}")
        if type_k not in _CACHE_TYPES:
            raise ValueError(f"type_k must be one of {sorted(_CACHE_TYPES)}, got {type_k!r}")
        if not 1 <= n_seq <= MAX_SEQ:
            raise ValueError(f"n_seq must be between 1 and {MAX_SEQ}, got {n_seq}")
        self.model = model
        self.params = p
        self.n_ctx, self.n_ubatch, self.type_k, self.n_seq = n_ctx, min(n_ubatch, n_ctx), type_k, n_seq
        self.n_blocks = p.n_layer + (1 if mtp else 0)
        if not 0 <= keep_back < self.n_ubatch:
            raise ValueError(f"keep_back must be between 0 and n_ubatch - 1 = {self.n_ubatch - 1}, got {keep_back}")
        self.keep_back = keep_back
        self.backup = [None] * n_seq
        self.be = backends if backends is not None else Backends("auto")
        check_device_limits([d["name"] for d in self.be.device_info()], p.n_expert_used)
        # a split across RPC devices: each layer's weights and state on its device, the rest (and the MTP block) local
        self.layer_dev = self.be.layer_devices(p.n_layer) if self.be.n_remote else None
        if hot_experts and self.be.n_remote:
            raise ValueError("hot experts on a device do not combine with a split across RPC servers")
        if not 0 <= hot_experts <= p.n_expert:
            raise ValueError(f"hot_experts must be between 0 (off) and the model's {p.n_expert} experts, got "
                             f"{hot_experts} (Llama's moe_device_experts, --moe-device-experts)")
        if self.layer_dev is not None:
            self.wm = model.weights(self.be, self.layer_dev)
        elif hot_experts and self.be.n > 1:  # the experts stay in host memory, the rest goes to the device
            self.wm = model.weights(self.be, experts_on_cpu=True)
        else:
            self.wm = model.weights(self.be)
        self.ring = ring_rows(p, n_ctx, self.n_ubatch)
        self._fill_params(p)
        self.hot = None
        if hot_experts:
            self._bind_hot(HotExperts(self.wm, self.be, self.be.n_remote, range(p.n_layer), hot_experts))
        self.hp.window = window(p, n_ctx)
        self.hp.attn_f16 = flash_attn
        # our CPU custom ops (kernels/dsv4_gemm.h, dsv4_hc.h) read every tensor in host memory: CPU-only backend sets
        self.hp.cpu_only = self.be.n == 1 and not self.be.is_portable
        self.hp.gemm_isa = _ggml.gemm_isa(gemm) if self.hp.cpu_only else 0
        self.hp.gemm_min_tokens = max(gemm_min_tokens, 1)
        self._alloc_state(p)
        self.routes = <g.ggml_tensor **> calloc(p.n_layer, sizeof(g.ggml_tensor *))
        self.plans = <SeqPlan *> calloc(n_seq, sizeof(SeqPlan))
        self.seq_inputs = <SeqInputs *> calloc(n_seq, sizeof(SeqInputs))
        if self.routes == NULL or self.plans == NULL or self.seq_inputs == NULL:
            raise MemoryError()
        self.route_sink = None
        self.mtp_key = -1
        self.hold_mtp_graph = True
        self._graph_room(1)
        self.past = [0] * n_seq
        self.slot_pos = [None] * n_seq
        self.mtp_past = [0] * n_seq
        self.mtp_slot_pos = [None] * n_seq
        self.last_h = None
        for s in range(n_seq):
            self.reset(s)

    def __dealloc__(self):
        self._mtp_drop()
        if self.mtp_sched != NULL:
            g.ggml_backend_sched_free(self.mtp_sched)
        if self.sched != NULL:
            g.ggml_backend_sched_free(self.sched)
        for i in range(self.n_st):
            if self.st_buf != NULL and self.st_buf[i] != NULL:
                g.ggml_backend_buffer_free(self.st_buf[i])
            if self.st_ctx != NULL and self.st_ctx[i] != NULL:
                g.ggml_free(self.st_ctx[i])
        free(self.st_buf)
        free(self.st_ctx)
        free(self.lw)
        free(self.st)
        free(self.plans)
        free(self.seq_inputs)
        free(self.routes)
        free(self.arena)

    # ---------------------------------------------------------------------------------------------- setup

    cdef _graph_room(self, int n_seq):
        """A graph arena and a scheduler for ubatches of up to n_seq sequences, grown when a larger mix comes. The
        scheduler's buffers are proportional to the graph size (about 20 KB of address space per graph tensor,
        mostly never touched: ggml sizes them for one split per node): MemoryError, the current ones kept, when
        they cannot be had."""
        cdef int room = 1
        while room < n_seq:
            room *= 2
        cdef size_t size = (_NODES_PER_LAYER + _SEQ_NODES_PER_LAYER * (room - 1)) * self.hp.n_layer + 1024
        if self.sched != NULL and size <= self.graph_size:
            return
        cdef size_t arena_size = size * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(size, False)
        cdef size_t sched_bytes = size * _SCHED_BYTES_PER_TENSOR
        cdef void * probe = malloc(sched_bytes)  # ggml's scheduler does not check its allocations
        cdef void * arena = malloc(arena_size) if probe != NULL else NULL
        free(probe)
        if arena == NULL:
            raise MemoryError(f"a ubatch of {n_seq} sequences needs {(arena_size + sched_bytes) / 2**30:.1f} GiB of "
                              "address space for its graph; mix fewer sequences")
        if self.sched != NULL:
            g.ggml_backend_sched_free(self.sched)
            self.sched = NULL
        free(self.arena)
        self.arena, self.arena_size, self.graph_size = arena, arena_size, size
        self.sched = g.ggml_backend_sched_new(self.be.backends, self.be.bufts, self.be.n, size, False, True)
        if self.sched == NULL:
            raise RuntimeError("ggml could not create a scheduler")
        if self._capture is not None:
            g.ggml_backend_sched_set_eval_callback(self.sched, _capture_cb, <void *> self._capture)

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
        self.lw = <LayerW *> calloc(self.n_blocks, sizeof(LayerW))
        if self.lw == NULL:
            raise MemoryError()
        cdef LayerW * L
        cdef dsv4_rope_params * rope
        for il in range(self.n_blocks):
            L = &self.lw[il]
            L.attn.kind = p.kind(il)
            L.ffn.hash = p.is_hash_layer(il)
            L.ffn.clamp_exp, L.ffn.clamp_sh = p.clamp_exp(il), p.clamp_shexp(il)
            rope = &L.attn.rope
            (rope.n_ctx_orig, rope.freq_base, rope.freq_scale, rope.ext_factor, rope.attn_factor, rope.beta_fast,
             rope.beta_slow) = p.rope(il)
            for spec in layer_tensors(p, il):
                if spec.dest in _MTP_FIELDS:
                    _bind(&self.mw, _MTP_FIELDS[spec.dest], w.get(spec.name))
                elif spec.dest is not None:
                    _bind(L, _LAYER_FIELDS[spec.dest], w.get(spec.name))
            if il >= p.n_layer:  # the MTP block's optional own embedding and head (else the model's)
                for spec in optional_nextn_tensors(p, il):
                    if spec.name in w:
                        _bind(&self.mw, _MTP_FIELDS[spec.dest], w.get(spec.name))

    cdef _bind_hot(self, hot):
        """Point each layer's HotW at its hot tensors (engine/hot_experts.py)."""
        cdef DeviceTensors dt = hot.tensors
        cdef HotW * H
        for il in hot.layers:
            H = &self.lw[<int> il].ffn.hot
            H.gate = dt.get(hot.name(il, "gate"))
            H.up = dt.get(hot.name(il, "up"))
            H.down = dt.get(hot.name(il, "down"))
            H.slot = dt.get(hot.name(il, "slot"))
            H.cold = dt.get(hot.name(il, "cold"))
            H.is_hot = dt.get(hot.name(il, "is_hot"))
            H.all_hot = hot.count == hot.n_expert
        self.hot = hot

    @property
    def hot_experts(self):
        """The hot experts on the device (engine/hot_experts.py's HotExperts: `hot(il)`, `assign(il, experts)`,
        `nbytes`, `device`), or None when the context was made without them."""
        return self.hot

    cdef _alloc_state(self, p):
        layout = state_tensors(p, self.n_ctx, self.n_ubatch, self.type_k, self.n_blocks > p.n_layer, self.keep_back)
        home = self.be.n_remote
        dev = [self.layer_dev[il] if self.layer_dev is not None and il < p.n_layer else home
               for il in range(self.n_blocks)]
        self.n_st = self.be.n
        self.st_ctx = <g.ggml_context **> calloc(self.n_st, sizeof(g.ggml_context *))
        self.st_buf = <g.ggml_backend_buffer_t *> calloc(self.n_st, sizeof(g.ggml_backend_buffer_t))
        self.st = <LayerState *> calloc(self.n_seq * self.n_blocks, sizeof(LayerState))
        if self.st_ctx == NULL or self.st_buf == NULL or self.st == NULL:
            raise MemoryError()
        cdef g.ggml_init_params ip
        ip.mem_buffer = NULL
        ip.no_alloc = True
        for d in set(dev):
            ip.mem_size = (self.n_seq * len(layout) + 1) * g.ggml_tensor_overhead()
            self.st_ctx[<int> d] = g.ggml_init(ip)
            if self.st_ctx[<int> d] == NULL:
                raise MemoryError()
        cdef g.ggml_tensor * t
        cdef int s
        for s in range(self.n_seq):
            for spec in layout:
                t = g.ggml_new_tensor_2d(self.st_ctx[<int> dev[spec.layer]], _CACHE_TYPES[spec.dtype], spec.ne[0],
                                         spec.ne[1])
                _bind(&self.st[s * self.n_blocks + spec.layer], _STATE_FIELDS[spec.name], t)
        self.overlap_init = [il for il in range(p.n_layer) if p.kind(il) == CSA]
        self.comp_ratios = tuple(sorted({int(p.kind(il)) for il in range(p.n_layer)} - {0}))
        for d in set(dev):
            self.st_buf[<int> d] = g.ggml_backend_alloc_ctx_tensors_from_buft(
                self.st_ctx[<int> d], g.ggml_backend_dev_buffer_type(self.be.dev_at(d)))
            if self.st_buf[<int> d] == NULL:
                need = state_bytes(p, self.n_ctx, self.n_ubatch, self.type_k, self.n_seq, self.n_blocks > p.n_layer,
                                   self.keep_back)
                raise MemoryError(f"could not allocate {need} bytes of context state for n_ctx={self.n_ctx}, "
                                  f"n_seq={self.n_seq}" + (f" on {self.be.names[d]}" if self.layer_dev else ""))
            g.ggml_backend_buffer_clear(self.st_buf[<int> d], 0)  # finite everywhere: masked slots hold no NaNs

    # ---------------------------------------------------------------------------------------------- state

    @property
    def state_bytes(self) -> int:
        """Bytes of the per-sequence state (caches and compressor rows) this context allocated, all sequences."""
        return sum(g.ggml_backend_buffer_get_size(self.st_buf[i]) for i in range(self.n_st) if self.st_buf[i] != NULL)

    def bytes_per_token(self) -> float:
        """The state bytes that grow with n_ctx, per token of context of one sequence (the compressed caches)."""
        return bytes_per_token(self.params, self.type_k)

    def weight_range(self, str name):
        """(address, nbytes) of a weight tensor's data in host memory (the mapped file, or memory the weights were
        read into), or None on a device."""
        return self.wm.host_range(name)

    @property
    def moe_prefetch(self) -> bool:
        """Routing-aware prefetch (docs/moe-residency.md, "Prefetch"): as soon as a layer's routing is known (hash
        layers: at the start of the ubatch), the routed experts' pages that are not in memory are asked for with
        madvise(MADV_WILLNEED), and the shared expert computes while they come. Results never change. Needs every
        weight in host memory (a CPU-only backend set); off by default."""
        return self.hp.prefetch != NULL

    @moe_prefetch.setter
    def moe_prefetch(self, bint on):
        if on and not self.hp.cpu_only:
            raise ValueError("moe_prefetch needs every weight in host memory (the CPU backend alone)")
        self._mtp_drop()  # a held graph was built with the earlier setting
        self.hp.prefetch = &self.pf_stats if on else NULL

    def prefetch_stats(self) -> dict:
        """moe_prefetch's counters since the context was made: `calls` (prefetch nodes run: layers x ubatches),
        `slices` (expert slices of the gate, up and down tensors checked), `missing_slices` (of which some pages were
        not in memory: a madvise was issued), `missing_bytes` (bytes of the spans advised)."""
        st = self.pf_stats
        return {"calls": st.calls, "slices": st.slices, "missing_slices": st.missing_slices,
                "missing_bytes": st.missing_bytes}

    @property
    def backends(self):
        return self.be

    @property
    def n_past(self) -> int:
        """Positions sequence 0 holds (n_past_of for the others)."""
        return self.past[0]

    def n_past_of(self, seq_id) -> int:
        """Positions the sequence holds."""
        return self.past[self._seq(seq_id)]

    cdef int _seq(self, seq_id) except -1:
        """seq_id as an index into this context's sequences; ValueError unless it is one."""
        try:
            s = operator.index(seq_id)
        except TypeError:
            raise ValueError(f"seq_id must be an integer, got {seq_id!r}") from None
        if not 0 <= s < self.n_seq:
            raise ValueError(f"seq_id {s} is outside this context's sequences [0, {self.n_seq})")
        return s

    def reset(self, seq_id=0):
        """Forget a sequence: position 0, empty window, the compressors' virtual block before position 0."""
        cdef int sid = self._seq(seq_id)
        self.past[sid] = 0
        self.slot_pos[sid] = np.full(self.ring, -(1 << 40), np.int64)
        self.mtp_past[sid] = 0
        self.mtp_slot_pos[sid] = np.full(self.ring, -(1 << 40), np.int64)
        self.backup[sid] = None
        cdef LayerState * s
        for il in self.overlap_init:  # overlapping compressors read a block "before" block 0: value 0, score -inf
            s = &self.st[sid * self.n_blocks + il]
            for kv_t, sc_t in ((<size_t> s.c.kv, <size_t> s.c.sc), (<size_t> s.ic.kv, <size_t> s.ic.sc)):
                width = (<g.ggml_tensor *> kv_t).ne[0]
                set_rows(<g.ggml_tensor *> kv_t, np.zeros((8, width), np.float32))
                sc = np.zeros((8, width), np.float32)
                sc[:4] = -np.inf
                set_rows(<g.ggml_tensor *> sc_t, sc)

    def truncate(self, tokens, seq_id=0) -> int:
        """Make a sequence hold exactly `tokens`, which the caller says are the first k of the tokens it holds (the
        context keeps no token ids), reusing what is still exact (docs/architecture.md §11.4): the compressed
        entries of blocks complete at k, the ring's window, the compressor rows of blocks that k shares with what
        is held. Only the positions from rebuild_start(seq_id, k) to k are evaluated again; without such a start
        (the window before it is no longer in the ring, or it is 0, or k is beyond what is held) the sequence
        starts over and all k are. Returns the number of positions evaluated."""
        cdef int sid = self._seq(seq_id)
        toks = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        cdef int k = toks.shape[0]
        if k:
            toks = self._tokens(sid, toks, 0)  # checked before anything changes
        cdef int a = self.rebuild_start(sid, k), cut = k
        if self.mtp_past[sid] > max(k - 1, 0):  # its row p read the token at p + 1: rows from k - 1 go
            self.mtp_truncate(max(k - 1, 0), sid)
        if a != k and self._restore(sid, k):  # a short truncation after a ubatch: its backup rows suffice
            slot_pos = self.slot_pos[sid]
            slot_pos[slot_pos >= k] = -(1 << 40)
            self.past[sid] = k
            self.backup[sid] = None
            return 0
        if a < 0:
            mtp_kept = self.mtp_past[sid], self.mtp_slot_pos[sid]  # the MTP block's window stays exact
            self.reset(sid)
            self.mtp_past[sid], self.mtp_slot_pos[sid] = mtp_kept
            a, cut = 0, -1  # a plain evaluation: it pools every block again
        else:
            slot_pos = self.slot_pos[sid]
            slot_pos[slot_pos >= a] = -(1 << 40)  # those positions are written again (or not held any more)
            self.past[sid] = a
        if a == k:
            return 0
        for s in range(a, k, self.n_ubatch):
            self._ubatch([(sid, toks[s : min(s + self.n_ubatch, k)], 0)], cut)
        self._end_capture()
        return k - a

    def _restore(self, int sid, int k):
        """Make the compressor rows of a sequence those of its first k positions from the backup rows its last
        ubatch wrote (docs/speculative.md), when they cover them and the window before k is still in the ring;
        False (nothing changed) otherwise."""
        got = self.backup[sid]
        cdef int e = self.past[sid]
        if got is None or got[0] != e or not 0 < k < e or e - k > self.keep_back:
            return False
        held = np.arange(max(0, k - self.hp.window + 1), k, dtype=np.int64)
        if not np.array_equal(self.slot_pos[sid][held % self.ring], held):
            return False
        cdef LayerState * s
        cdef g.ggml_tensor * t
        plans = []
        for R in self.comp_ratios:
            lo, s1, need = got[1][R], first_kept_row(R, e), first_kept_row(R, k)
            if need == s1:
                continue  # the rows of k's blocks are the state's own
            if need < lo:
                return False
            plans.append((R, lo, s1, need))
        for R, lo, s1, need in plans:
            pos = np.arange(need, k)
            src = np.where(pos < s1, (2 * R if R == CSA else R) + pos - lo, pos - s1)
            for il in range(self.hp.n_layer):
                if self.lw[il].attn.kind != R:
                    continue
                s = &self.st[sid * self.n_blocks + il]
                for ptr in (<size_t> s.c.kv, <size_t> s.c.sc, <size_t> s.ic.kv, <size_t> s.ic.sc):
                    if not ptr:
                        continue
                    t = <g.ggml_tensor *> ptr
                    rows = np.empty((t.ne[1], t.ne[0]), np.float32)
                    g.ggml_backend_tensor_get(t, <void *> (<size_t> rows.ctypes.data), 0, rows.nbytes)
                    set_rows(t, rows[src])
        return True

    def rebuild_start(self, seq_id, int k) -> int:
        """Where truncate(k tokens) starts evaluating again, or -1 where it starts over (docs/architecture.md §11.4):
        for each compressed kind (ratio R) whose block holding position k differs from that holding n_past, its
        compressor rows from first_kept_row (the start of that block; for R = 4 the previous block's) are lost, and
        the earliest such position is the start; it needs the window before it (W - 1 positions) still in the
        ring. No kind losing rows: k itself (nothing is evaluated)."""
        cdef int sid = self._seq(seq_id)
        cdef int n = self.past[sid]
        if k < 0 or k > n:
            return -1
        cdef int a = k, R
        for R in self.comp_ratios:
            if k // R != n // R:
                a = min(a, first_kept_row(R, k))
        if a <= 0:
            return -1
        held = np.arange(max(0, a - self.hp.window + 1), a, dtype=np.int64)
        if not np.array_equal(self.slot_pos[sid][held % self.ring], held):
            return -1
        return a

    _STATE_MAGIC = b"DSV4CTX1"

    def save_state(self, seq_id=0) -> bytes:
        """A sequence's whole state (position, window slots, every cache and compressor row) as bytes."""
        cdef int sid = self._seq(seq_id)
        parts = [self._STATE_MAGIC, np.array([self.past[sid], self.ring, self.hp.n_layer], np.int64).tobytes(),
                 np.asarray(self.slot_pos[sid], np.int64).tobytes()]
        cdef g.ggml_tensor * t
        for t_addr in self._state_tensors(sid):
            t = <g.ggml_tensor *> <size_t> t_addr
            buf = np.empty(g.ggml_nbytes(t), np.uint8)
            g.ggml_backend_tensor_get(t, <void *> (<size_t> buf.ctypes.data), 0, buf.nbytes)
            parts.append(buf.tobytes())
        return b"".join(parts)

    def check_state(self, data) -> int:
        """The number of positions a save_state() blob holds; ValueError, naming the sizes, unless it is a state of
        a sequence of a context like this one (same model, n_ctx, n_ubatch and type_k; any sequence). Reads the
        blob, changes nothing."""
        want = len(self._STATE_MAGIC) + 24 + 8 * self.ring
        for t_addr in self._state_tensors(0):
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

    def load_state(self, data, seq_id=0) -> None:
        """Restore a sequence's state from save_state() of a context with the same model, n_ctx, n_ubatch and type_k
        (any of its sequences); nothing changes when `data` is not one (check_state) or seq_id is not a sequence."""
        cdef int sid = self._seq(seq_id)
        n_past = self.check_state(data)
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef size_t off = len(self._STATE_MAGIC) + 24 + 8 * self.ring
        cdef g.ggml_tensor * t
        slot_pos = np.frombuffer(view, np.int64, self.ring, len(self._STATE_MAGIC) + 24).copy()
        for t_addr in self._state_tensors(sid):
            t = <g.ggml_tensor *> <size_t> t_addr
            size = g.ggml_nbytes(t)
            g.ggml_backend_tensor_set(t, &view[off], 0, size)
            off += size
        self.past[sid] = n_past
        self.slot_pos[sid] = slot_pos
        self.backup[sid] = None
        self.mtp_past[sid] = 0  # the MTP block's window is not in a saved state: it reads the positions again
        self.mtp_slot_pos[sid] = np.full(self.ring, -(1 << 40), np.int64)

    def _state_tensors(self, int sid):
        out = []
        cdef LayerState * s
        for il in range(self.hp.n_layer):
            s = &self.st[sid * self.n_blocks + il]
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

    def _end_capture(self):
        if self._capture is not None:
            g.ggml_backend_sched_set_eval_callback(self.sched, NULL, NULL)
            self._capture = None

    def _tokens(self, int sid, tokens, int at=-1):
        """A sequence's next tokens as int32, checked: ValueError unless there is at least one, every id is in the
        vocabulary and they fit the sequence's context after position `at` (default: what it holds)."""
        toks = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0:
            raise ValueError("eval needs at least one token")
        if toks.min() < 0 or toks.max() >= self.hp.n_vocab:
            bad = toks[(toks < 0) | (toks >= self.hp.n_vocab)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.hp.n_vocab})")
        if at < 0:
            at = self.past[sid]
        if at + n > self.n_ctx:
            raise ValueError(f"{at} + {n} tokens exceed the context of {self.n_ctx} tokens")
        return toks.astype(np.int32)

    def eval(self, tokens, bint all_logits=False, seq_id=0, bint want_h=False):
        """Append `tokens` (int ids) to a sequence; returns float32 logits [n_tokens, n_vocab] (all_logits) or
        [1, n_vocab] for the last token. Tokens are computed in ubatches of at most n_ubatch. want_h: last_h holds
        the final hyper-connection streams of every token, float32 [n_tokens, D*hc] (the MTP block's input)."""
        cdef int sid = self._seq(seq_id)
        toks = self._tokens(sid, tokens)
        n = toks.shape[0]
        out, hs = [], []
        for s in range(0, n, self.n_ubatch):
            chunk = toks[s : s + self.n_ubatch]
            last = s + self.n_ubatch >= n
            n_out = chunk.shape[0] if all_logits else (1 if last else 0)
            res = self._ubatch([(sid, chunk, n_out)], -1, want_h)
            if want_h:
                hs.append(self.last_h)
            if res is not None:
                out.append(res)
        self._end_capture()
        if want_h:
            self.last_h = np.concatenate(hs) if len(hs) > 1 else hs[0]
        return np.concatenate(out) if len(out) > 1 else out[0]

    def eval_batch(self, seqs, bint all_logits=False):
        """Append tokens to several distinct sequences in one ubatch, one graph compute (docs/batching.md): `seqs`
        is a list of (seq_id, tokens), at most n_ubatch tokens in all. Returns each sequence's float32 logits, in
        the order of `seqs`: [n_tokens, n_vocab] (all_logits) or [1, n_vocab] for its last token. ValueError, and
        nothing evaluated, for an unknown or repeated seq_id, an empty list, or tokens eval() would refuse."""
        items = list(seqs)
        if not items:
            raise ValueError("eval_batch needs at least one sequence")
        batch, seen, total = [], set(), 0
        for item in items:
            try:
                seq_id, tokens = item
            except (TypeError, ValueError):
                raise ValueError(f"eval_batch takes (seq_id, tokens) pairs, got {item!r:.80}") from None
            sid = self._seq(seq_id)
            if sid in seen:
                raise ValueError(f"seq_id {sid} appears twice in one batch")
            seen.add(sid)
            toks = self._tokens(sid, tokens)
            total += toks.shape[0]
            batch.append((sid, toks, toks.shape[0] if all_logits else 1))
        if total > self.n_ubatch:
            raise ValueError(f"{total} tokens in one batch, more than n_ubatch={self.n_ubatch}")
        res = self._ubatch(batch)
        self._end_capture()
        out, row = [], 0
        for _, _, n_out in batch:
            out.append(res[row : row + n_out])
            row += n_out
        return out

    cdef _ubatch(self, list batch, int cut=-1, bint want_h=False):
        """One graph compute over `batch`: (seq_id, int32 tokens, logits rows wanted: its last n_out) per sequence,
        distinct sequences; returns the logits wanted, in order (None if none). cut >= 0: positions evaluated again
        by truncate(cut), whose compressors only keep rows (plan_rebuild). want_h: last_h gets the final streams of
        every row."""
        cdef SeqPlan * sp
        cdef int s, sid, n = 0, p0, ns
        self._graph_room(len(batch))
        for s in range(len(batch)):
            sid, toks, want = batch[s]
            sp = &self.plans[s]
            p0, ns = self.past[sid], toks.shape[0]
            sp.n, sp.t0, sp.p0 = ns, n, p0
            sp.st = &self.st[sid * self.n_blocks]
            if cut >= 0:
                plan_rebuild(&sp.comp[COMP_CSA], CSA, p0, ns, cut)
                plan_rebuild(&sp.comp[COMP_HCA], HCA, p0, ns, cut)
            else:
                plan_compressor(&sp.comp[COMP_CSA], CSA, p0, ns, self.keep_back)
                plan_compressor(&sp.comp[COMP_HCA], HCA, p0, ns, self.keep_back)
            n += ns
        res = self._compute(batch, self.past, self.slot_pos, None, want_h)
        for sid, toks, _ in batch:  # the backup rows this ubatch wrote: (positions held after it, first position)
            p0 = self.past[sid] - toks.shape[0]
            self.backup[sid] = (self.past[sid], {R: backup_start(R, p0, toks.shape[0], self.keep_back)
                                                 for R in self.comp_ratios}) if self.keep_back and cut < 0 else None
        return res

    cdef _compute(self, list batch, list past, list slot_pos, h_in, bint want_h):
        """Build, allocate, fill and compute the graph of the ubatch self.plans describes: the main model's, or
        with h_in (float32 [n, D*hc]) the MTP block's; past / slot_pos are the positions and ring of what it
        reads and writes (the main model's or the MTP block's); advances past."""
        cdef UBatch ub
        cdef int n = 0, n_out = 0
        for _, toks, want in batch:
            n += toks.shape[0]
            n_out += want
        ub.n, ub.n_seq, ub.seq, ub.ring = n, len(batch), self.plans, self.ring
        ub.n_out = n_out if n_out > 0 else 1
        sink = self.route_sink if h_in is None else None
        ub.want_routes = sink is not None
        ub.want_h = want_h
        cdef g.ggml_init_params ip
        ip.mem_size = self.arena_size
        ip.mem_buffer = self.arena
        ip.no_alloc = True
        cdef g.ggml_context * ctx = g.ggml_init(ip)
        if ctx == NULL:
            raise MemoryError()
        cdef Inputs inp
        inp.routes = self.routes
        inp.seq = self.seq_inputs
        cdef g.ggml_cgraph * gf
        cdef g.ggml_tensor * logits
        cdef g.ggml_status status
        cdef double t0 = _now()
        cdef bint mtp = h_in is not None
        cdef int il = self.hp.n_layer
        try:
            gf = g.ggml_new_graph_custom(ctx, self.graph_size, False)
            with nogil:
                if mtp:
                    logits = build_mtp_graph(ctx, gf, &self.hp, &self.gw, self.lw, &self.mw, il, &ub, &inp)
                else:
                    logits = build_graph(ctx, gf, &self.hp, &self.gw, self.lw, &ub, &inp)
            self.last_graph_nodes = g.ggml_graph_n_nodes(gf)
            self.last_graph_mem = g.ggml_used_mem(ctx)
            self.last_graph_tensors = ((self.last_graph_mem - g.ggml_graph_overhead_custom(self.graph_size, False))
                                       // g.ggml_tensor_overhead())
            g.ggml_backend_sched_reset(self.sched)
            if not g.ggml_backend_sched_alloc_graph(self.sched, gf):
                raise MemoryError("ggml could not allocate the compute graph")
            self.last_graph_splits = g.ggml_backend_sched_get_n_splits(self.sched)
            if self.be.n > 1:
                self._check_placement(self.sched, gf)
            ti = _now()
            toks_all = self._set_inputs(&ub, &inp, batch, past, slot_pos)
            if mtp:
                set_input(inp.h_in, h_in)
            t1 = _now()
            self.t_graph += ti - t0
            self.t_inputs += t1 - ti
            with nogil:
                status = g.ggml_backend_sched_graph_compute(self.sched, gf)
            self.t_compute += _now() - t1
            if status != g.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"graph compute failed (status {<int> status})")
            for sid, toks, _ in batch:
                past[sid] += toks.shape[0]
            if ub.want_routes:
                sink(self._routes(n), toks_all)
            return self._outputs(&inp, logits, n, n_out, want_h)
        finally:
            g.ggml_free(ctx)

    cdef _check_placement(self, g.ggml_backend_sched_t sched, g.ggml_cgraph * gf):
        """With a device besides the CPU (a GPU, an RPC server): count the nodes the scheduler gave each backend
        (last_node_backends), and refuse a node with a function pointer (a CPU custom op) anywhere but on the CPU:
        it reads host memory, and an RPC server would call an address of this process. The graph is portable then
        (no custom op of ours); this checks the scheduler's assignment."""
        cdef int nb = self.be.n
        cdef g.ggml_backend_t cpu = self.be.backends[nb - 1]
        cdef g.ggml_backend_t b
        cdef g.ggml_tensor * t
        cdef int counts[64]
        cdef int i, j, n_nodes = g.ggml_graph_n_nodes(gf), n_count = min(nb, 64)
        memset(counts, 0, sizeof(counts))
        for i in range(n_nodes):  # (C ints: no Python object per node and token)
            t = g.ggml_graph_node(gf, i)
            b = g.ggml_backend_sched_get_tensor_backend(sched, t)
            for j in range(n_count):
                if self.be.backends[j] == b:
                    counts[j] += 1
                    break
            if strstr(g.ggml_op_desc(t), b"CUSTOM") != NULL and b != NULL and b != cpu:  # (C strings)
                raise RuntimeError(f"node {t.name.decode()!r} (a CPU custom op) was scheduled on "
                                   f"{g.ggml_backend_name(b).decode()}")
        self.last_node_backends = tuple(counts[j] for j in range(n_count))

    def node_backends(self) -> dict:
        """The last graph's nodes per backend ({device name: nodes}, in backend order: the device(s), the CPU
        last), as ggml's scheduler assigned them; a CPU-only context has every node on the CPU."""
        names = [d["name"] for d in self.be.device_info()]
        if self.be.n == 1 or self.last_node_backends is None:
            return {names[-1]: self.last_graph_nodes}
        return dict(zip(names, self.last_node_backends))

    cdef _outputs(self, const Inputs * inp, g.ggml_tensor * logits, int n, int n_out, bint want_h):
        """After a compute: last_h from the final streams (want_h), and the logits of the n_out rows wanted (None
        when none is)."""
        if want_h:
            self.last_h = np.empty((n, self.hp.n_embd * self.hp.hc), np.float32)
            g.ggml_backend_tensor_get(inp.h_out, <void *> (<size_t> self.last_h.ctypes.data), 0, self.last_h.nbytes)
        if n_out == 0:
            return None
        res = np.empty((n_out, self.hp.n_vocab), np.float32)
        g.ggml_backend_tensor_get(logits, <void *> (<size_t> res.ctypes.data), 0, res.nbytes)
        return res

    def mtp_eval(self, tokens, h, seq_id=0, bint all_logits=True, bint want_h=False):
        """Run the MTP block (docs/speculative.md) on a sequence's next MTP positions (from mtp_n_past): row t reads
        tokens[t], the token after its position, and h[t] (float32 [n, D*hc]: the main model's final streams at
        that position, last_h of eval(want_h=True), or for a further draft the MTP's own); returns the logits of
        the token after that, [n, n_vocab] (all_logits) or [1, n_vocab], and with want_h sets last_h to the MTP
        block's streams of every row. Needs a context made with mtp=True."""
        if self.n_blocks == self.hp.n_layer:
            raise ValueError("this context does not run the MTP block: create it with mtp=True")
        cdef int sid = self._seq(seq_id)
        toks = self._tokens(sid, tokens, self.mtp_past[sid])
        cdef int n = toks.shape[0]
        hh = np.ascontiguousarray(h, dtype=np.float32)
        if hh.shape != (n, self.hp.n_embd * self.hp.hc):
            raise ValueError(f"h must be float32 [{n}, {self.hp.n_embd * self.hp.hc}], got {hh.shape}")
        if n > self.n_ubatch:
            raise ValueError(f"{n} MTP rows, more than n_ubatch={self.n_ubatch}")
        cdef SeqPlan * sp = &self.plans[0]
        sp.n, sp.t0, sp.p0 = n, 0, self.mtp_past[sid]
        sp.st = &self.st[sid * self.n_blocks]
        plan_compressor(&sp.comp[COMP_CSA], CSA, sp.p0, n, 0)  # not read: the MTP block has no compressor
        plan_compressor(&sp.comp[COMP_HCA], HCA, sp.p0, n, 0)
        if n == 1 and self._capture is None and self.hold_mtp_graph:
            return self._mtp_row(sid, toks, hh, want_h)
        self._graph_room(1)
        res = self._compute([(sid, toks, n if all_logits else 1)], self.mtp_past, self.mtp_slot_pos, hh, want_h)
        self._end_capture()
        return res

    cdef _mtp_row(self, int sid, toks, hh, bint want_h):
        """mtp_eval of one row (self.plans[0] planned): the held one-row graph of this sequence, built and allocated
        on the first such step, run again with this row's inputs (the same nodes as a fresh build: the same
        numbers)."""
        cdef UBatch ub
        ub.n, ub.n_seq, ub.seq, ub.ring, ub.n_out = 1, 1, self.plans, self.ring, 1
        ub.want_routes, ub.want_h = False, want_h
        cdef double t0 = _now()
        if self.mtp_key != 2 * sid + want_h:
            self._mtp_build(&ub)
            self.mtp_key = 2 * sid + want_h
        batch = [(sid, toks, 1)]
        cdef double ti = _now()
        self._set_inputs(&ub, &self.mtp_inp, batch, self.mtp_past, self.mtp_slot_pos)
        set_input(self.mtp_inp.h_in, hh)
        cdef double t1 = _now()
        self.t_graph += ti - t0
        self.t_inputs += t1 - ti
        cdef g.ggml_status status
        with nogil:
            status = g.ggml_backend_sched_graph_compute(self.mtp_sched, self.mtp_gf)
        self.t_compute += _now() - t1
        if status != g.GGML_STATUS_SUCCESS:
            self._mtp_drop()
            raise RuntimeError(f"graph compute failed (status {<int> status})")
        self.mtp_past[sid] += 1
        return self._outputs(&self.mtp_inp, self.mtp_logits, 1, 1, want_h)

    cdef _mtp_build(self, const UBatch * ub):
        """Build and allocate the MTP block's one-row graph of ub (its own arena and scheduler, so the main model's
        graphs in between leave it allocated)."""
        self._mtp_drop()
        cdef size_t size = _NODES_PER_LAYER + 1024
        cdef size_t arena_size = size * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(size, False)
        self.mtp_arena = malloc(arena_size)
        if self.mtp_arena == NULL:
            raise MemoryError()
        cdef g.ggml_init_params ip
        ip.mem_size = arena_size
        ip.mem_buffer = self.mtp_arena
        ip.no_alloc = True
        self.mtp_gctx = g.ggml_init(ip)
        if self.mtp_gctx == NULL:
            self._mtp_drop()
            raise MemoryError()
        if self.mtp_sched == NULL:
            self.mtp_sched = g.ggml_backend_sched_new(self.be.backends, self.be.bufts, self.be.n, size, False, True)
            if self.mtp_sched == NULL:
                self._mtp_drop()
                raise RuntimeError("ggml could not create a scheduler")
        self.mtp_inp.routes = self.routes
        self.mtp_inp.seq = &self.mtp_si
        self.mtp_gf = g.ggml_new_graph_custom(self.mtp_gctx, size, False)
        cdef int il = self.hp.n_layer
        with nogil:
            self.mtp_logits = build_mtp_graph(self.mtp_gctx, self.mtp_gf, &self.hp, &self.gw, self.lw, &self.mw, il, ub,
                                              &self.mtp_inp)
        g.ggml_backend_sched_reset(self.mtp_sched)
        if not g.ggml_backend_sched_alloc_graph(self.mtp_sched, self.mtp_gf):
            self._mtp_drop()
            raise MemoryError("ggml could not allocate the MTP graph")
        self.mtp_graph_builds += 1

    cdef _mtp_drop(self):
        """Forget the held one-row MTP graph (its scheduler stays, reset)."""
        if self.mtp_gctx != NULL:
            g.ggml_free(self.mtp_gctx)
            self.mtp_gctx = NULL
        free(self.mtp_arena)
        self.mtp_arena = NULL
        self.mtp_gf = NULL
        self.mtp_logits = NULL
        self.mtp_key = -1
        if self.mtp_sched != NULL:
            g.ggml_backend_sched_reset(self.mtp_sched)

    def mtp_n_past(self, seq_id=0) -> int:
        """Positions of a sequence the MTP block has read."""
        return self.mtp_past[self._seq(seq_id)]

    def mtp_truncate(self, int k, seq_id=0):
        """Forget the MTP block's positions from k on (its window is a ring: what it held before k stays)."""
        cdef int sid = self._seq(seq_id)
        if not 0 <= k <= self.mtp_past[sid]:
            raise ValueError(f"k must be between 0 and {self.mtp_past[sid]}, got {k}")
        self.mtp_past[sid] = k
        slot_pos = self.mtp_slot_pos[sid]
        slot_pos[slot_pos >= k] = -(1 << 40)

    def mtp_skip(self, int k, seq_id=0):
        """Let the MTP block go on at position k without reading the positions before it that it missed (a restored
        state, whose main streams are gone): its window simply lacks them."""
        cdef int sid = self._seq(seq_id)
        if not self.mtp_past[sid] <= k <= self.past[sid]:
            raise ValueError(f"k must be between {self.mtp_past[sid]} and {self.past[sid]}, got {k}")
        self.mtp_past[sid] = k

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

    cdef _set_inputs(self, const UBatch * ub, Inputs * inp, list batch, list past, list slot_pos):
        """Fill the graph's inputs: token-wise ones over all rows, each sequence's from its state; returns the
        ubatch's tokens."""
        toks = np.concatenate([t for _, t, _ in batch])
        pos = np.concatenate([np.arange(past[sid], past[sid] + t.shape[0], dtype=np.int64)
                              for sid, t, _ in batch])
        set_input(inp.tokens, toks)
        set_input(inp.pos, pos.astype(np.int32))
        cdef int c, s
        for c in range(N_COMP):
            set_input(inp.ape[c], (pos % ub.seq[0].comp[c].ratio).astype(np.int32))
        cdef const SeqPlan * sp
        rows = []
        for s in range(ub.n_seq):
            sid, _, n_out = batch[s]
            sp = &ub.seq[s]
            self._set_seq_inputs(sp, &inp.seq[s], slot_pos[sid], pos[sp.t0 : sp.t0 + sp.n])
            rows.append(np.arange(sp.t0 + sp.n - n_out, sp.t0 + sp.n, dtype=np.int32))
        set_input(inp.out_rows, np.concatenate(rows))
        return toks

    cdef _set_seq_inputs(self, const SeqPlan * sp, const SeqInputs * si, slot_pos, pos):
        slots = pos % self.ring
        set_input(si.raw_slot, slots)
        slot_pos[slots] = pos
        sp_ = slot_pos[None, :]
        vis = (sp_ <= pos[:, None]) & (sp_ > pos[:, None] - self.hp.window)
        set_input(si.raw_mask, np.where(vis, 0.0, -np.inf).astype(np.float32))  # [n, ring]
        cdef const CompPlan * cp
        cdef int c
        for c in range(N_COMP):
            cp = &sp.comp[c]
            if si.blk[c] != NULL:
                set_input(si.blk[c], ((cp.b0 + np.arange(cp.nb)) * cp.ratio).astype(np.int32))
            if si.vis[c] != NULL:
                visible = np.arange(cp.n_vis)[None, :] < ((pos + 1) // cp.ratio)[:, None]
                set_input(si.vis[c], np.where(visible, 0.0, -np.inf).astype(np.float32))
