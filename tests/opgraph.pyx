# cython: language_level=3
"""OpGraph: a small ggml graph built op by op from Python, for checking our kernels and blocks against numpy and
ggml in the tests. Test-only: it is not part of the package; tests/opgraph_build.py compiles it on first use."""
import numpy as np

cimport ggml as g
cimport dsv4_ops as k
from libc.stdint cimport int64_t, uint8_t

from llama_dsv4._ggml cimport Backends
from llama_dsv4._ggml import default_backends


cdef enum:
    _MAX_NODES = 256


cdef class OpGraph:
    """A small ggml graph built op by op from Python and computed through the backend scheduler.

    For checking kernels and blocks against numpy; the model's own graphs are built in Cython/C without
    Python per op.
    """
    cdef g.ggml_context * ctx
    cdef g.ggml_tensor * t[_MAX_NODES]
    cdef int n_t
    cdef list inputs
    cdef Backends be

    def __cinit__(self, Backends backends=None):
        cdef g.ggml_init_params ip
        ip.mem_size = _MAX_NODES * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(4 * _MAX_NODES, False)
        ip.mem_buffer = NULL
        ip.no_alloc = True
        self.ctx = g.ggml_init(ip)
        if self.ctx == NULL:
            raise MemoryError()
        self.n_t = 0
        self.inputs = []
        self.be = backends or default_backends()

    def __dealloc__(self):
        if self.ctx != NULL:
            g.ggml_free(self.ctx)

    cdef int _add(self, g.ggml_tensor * t) except -1:
        if t == NULL:
            raise ValueError("ggml rejected the shapes of this op")
        if self.n_t >= _MAX_NODES:
            raise ValueError("too many nodes in an OpGraph")
        self.t[self.n_t] = t
        self.n_t += 1
        return self.n_t - 1

    cdef g.ggml_tensor * _get(self, int h) except NULL:
        if not 0 <= h < self.n_t:
            raise IndexError(f"no tensor handle {h}")
        return self.t[h]

    def input(self, arr):
        """A graph input holding `arr` (float32 or int32, up to 4-D, numpy order); returns its handle."""
        a = np.ascontiguousarray(arr)
        if a.dtype == np.float32:
            typ = g.GGML_TYPE_F32
        elif a.dtype == np.int32:
            typ = g.GGML_TYPE_I32
        else:
            raise TypeError(f"OpGraph inputs are float32 or int32, got {a.dtype}")
        if not 1 <= a.ndim <= 4 or a.size == 0:
            raise ValueError(f"OpGraph inputs are 1-D to 4-D and non-empty, got shape {a.shape}")
        cdef int64_t ne[4]
        for d in range(4):
            ne[d] = a.shape[a.ndim - 1 - d] if d < a.ndim else 1
        h = self._add(g.ggml_new_tensor(self.ctx, <g.ggml_type> typ, a.ndim, ne))
        g.ggml_set_input(self.t[h])
        self.inputs.append((h, a))
        return h

    def input_raw(self, raw, int type_id, ne):
        """A graph input of ggml type `type_id` and shape `ne` (ggml order) holding the bytes `raw`."""
        a = np.ascontiguousarray(np.frombuffer(raw, dtype=np.uint8))
        if not 1 <= len(ne) <= 4 or any(d <= 0 for d in ne):
            raise ValueError(f"bad shape {ne}")
        cdef int64_t c_ne[4]
        for d in range(4):
            c_ne[d] = ne[d] if d < len(ne) else 1
        cdef size_t need = g.ggml_row_size(<g.ggml_type> type_id, c_ne[0]) * c_ne[1] * c_ne[2] * c_ne[3]
        if a.shape[0] != need:
            raise ValueError(f"{a.shape[0]} bytes for a tensor of {need}")
        h = self._add(g.ggml_new_tensor(self.ctx, <g.ggml_type> type_id, len(ne), c_ne))
        g.ggml_set_input(self.t[h])
        self.inputs.append((h, a))
        return h

    def mul_mat_id(self, int a, int b, int ids):
        """ggml's mul_mat_id: out[:, s, t] = a[:, :, ids[t, s]]^T b[:, s or 0, t]."""
        return self._add(g.ggml_mul_mat_id(self.ctx, self._get(a), self._get(b), self._get(ids)))

    def moe_gemm(self, int a, int b, int ids, int isa):
        """mul_mat_id through our K-quant x Q8_K kernels (kernels/dsv4_moe_gemm.c) with instruction set `isa`."""
        cdef g.ggml_tensor * prep = k.dsv4_q8k_prep(self.ctx, self._get(b), isa)
        if prep == NULL:
            raise ValueError("dsv4_q8k_prep rejected the activations")
        self._add(prep)
        return self._add(k.dsv4_mul_mat_id_kq(self.ctx, self._get(a), prep, self._get(ids), isa))

    def dense_kq(self, int w, int x, int isa):
        """mul_mat of K-quant weights through our kernels (kernels/dsv4_moe_gemm.c) with instruction set `isa`."""
        cdef g.ggml_tensor * prep = k.dsv4_q8k_prep(self.ctx, self._get(x), isa)
        if prep == NULL:
            raise ValueError("dsv4_q8k_prep rejected the activations")
        self._add(prep)
        return self._add(k.dsv4_mul_mat_kq(self.ctx, self._get(w), prep, isa))

    def dense_q80(self, int w, int x):
        """mul_mat of Q8_0 weights through our AVX-512 VNNI kernel (kernels/dsv4_gemm_vnni.c)."""
        cdef g.ggml_tensor * prep = k.dsv4_q80_prep(self.ctx, self._get(x))
        if prep == NULL:
            raise ValueError("dsv4_q80_prep rejected the activations")
        self._add(prep)
        return self._add(k.dsv4_mul_mat_q80(self.ctx, self._get(w), prep))

    def mul_mat(self, int w, int x):
        """ggml's mul_mat: out[b, n, m] = sum_k w[b, m, k] x[b, n, k]."""
        return self._add(g.ggml_mul_mat(self.ctx, self._get(w), self._get(x)))

    def hc_post(self, int x, int res, int post, int comb, bint ours=True):
        """The hyper-connection post mix: ours (kernels/dsv4_hc.c) or ggml's ggml_dsv4_hc_post."""
        a, r, p, c = self._get(x), self._get(res), self._get(post), self._get(comb)
        return self._add(k.dsv4_hc_post_cpu(self.ctx, a, r, p, c) if ours else g.ggml_dsv4_hc_post(self.ctx, a, r, p, c))

    def hc_gates(self, int mix, int scale, int base, int hc, int n_gates, float eps, bint ours=True):
        """The hyper-connection gates [hc, n, n_gates]: ours (kernels/dsv4_hc.c) or ggml's ops as the graph spelled
        them (mul, add, sigmoid, then + eps for pre, x 2 for post)."""
        cdef g.ggml_tensor * m = self._get(mix)
        cdef g.ggml_tensor * sc = self._get(scale)
        cdef g.ggml_tensor * b = self._get(base)
        if ours:
            return self._add(k.dsv4_hc_gates_cpu(self.ctx, m, sc, b, hc, n_gates, eps))
        cdef g.ggml_tensor * out = NULL
        cdef g.ggml_tensor * x
        cdef int j
        for j in range(n_gates):
            x = g.ggml_view_2d(self.ctx, m, hc, m.ne[1], m.nb[1], j * hc * sizeof(float))
            x = g.ggml_add(self.ctx, g.ggml_mul(self.ctx, x, g.ggml_view_1d(self.ctx, sc, 1, j * sizeof(float))),
                           g.ggml_view_1d(self.ctx, b, hc, j * hc * sizeof(float)))
            x = g.ggml_sigmoid(self.ctx, x)
            x = g.ggml_scale_bias(self.ctx, x, 1.0, eps) if j == 0 else g.ggml_scale(self.ctx, x, 2.0)
            out = x if out == NULL else g.ggml_concat(self.ctx, out, x, 2)
        return self._add(out)

    def swiglu_clamp(self, int gate, int up, float limit):
        return self._add(k.dsv4_swiglu_clamp(self.ctx, self._get(gate), self._get(up), limit))

    def rope_tail(self, int x, int pos, int n_rot, *, int n_ctx_orig=0, float freq_base=10000.0,
                  float freq_scale=1.0, float ext_factor=0.0, float attn_factor=1.0, float beta_fast=32.0,
                  float beta_slow=1.0, bint inverse=False, bint ours=False):
        """dsv4_rope_tail (or its inverse), its parts joined by ggml_concat or (ours) by our row-copying op."""
        cdef k.dsv4_rope_params p
        cdef k.dsv4_concat_fn cat = k.dsv4_concat_cpu if ours else <k.dsv4_concat_fn> NULL
        p.n_ctx_orig = n_ctx_orig
        p.freq_base = freq_base
        p.freq_scale = freq_scale
        p.ext_factor = ext_factor
        p.attn_factor = attn_factor
        p.beta_fast = beta_fast
        p.beta_slow = beta_slow
        if inverse:
            return self._add(k.dsv4_rope_tail_back(self.ctx, self._get(x), self._get(pos), n_rot, &p, cat))
        return self._add(k.dsv4_rope_tail(self.ctx, self._get(x), self._get(pos), n_rot, &p, cat))

    def concat(self, int a, int b, int dim, bint ours=True):
        """ggml_concat, or ours (kernels/dsv4_concat.c: ValueError where it does not apply)."""
        if ours:
            return self._add(k.dsv4_concat_cpu(self.ctx, self._get(a), self._get(b), dim))
        return self._add(g.ggml_concat(self.ctx, self._get(a), self._get(b), dim))

    def cast(self, int a, int type_id):
        """ggml_cast to ggml type `type_id`."""
        return self._add(g.ggml_cast(self.ctx, self._get(a), <g.ggml_type> type_id))

    def top_k(self, int a, int n_top):
        """Indices [n_top, rows] of the largest entries of each row (ties broken as the reference's CPU top-k)."""
        return self._add(k.dsv4_top_k(self.ctx, self._get(a), n_top))

    def compute(self, outputs):
        """Compute the graph and return the listed handles as float32/int32 numpy arrays (numpy order)."""
        cdef g.ggml_cgraph * gf = g.ggml_new_graph_custom(self.ctx, 4 * _MAX_NODES, False)
        cdef g.ggml_tensor * t
        for h in outputs:
            t = self._get(h)
            g.ggml_set_output(t)
            g.ggml_build_forward_expand(gf, t)
        cdef g.ggml_backend_sched_t sched = g.ggml_backend_sched_new(
            self.be.backends, NULL, self.be.n, 4 * _MAX_NODES, False, True)
        if sched == NULL:
            raise RuntimeError("ggml_backend_sched_new failed")
        cdef const uint8_t[::1] src
        cdef uint8_t[::1] dst
        cdef g.ggml_status st
        try:
            if not g.ggml_backend_sched_alloc_graph(sched, gf):
                raise MemoryError("ggml could not allocate the graph")
            for h, a in self.inputs:
                src = a.view(np.uint8).reshape(-1)
                g.ggml_backend_tensor_set(self.t[h], &src[0], 0, src.shape[0])
            with nogil:
                st = g.ggml_backend_sched_graph_compute(sched, gf)
            if st != g.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"graph compute failed with status {<int> st}")
            res = []
            for h in outputs:
                t = self.t[h]
                if t.type not in (g.GGML_TYPE_F32, g.GGML_TYPE_I32):
                    raise TypeError("OpGraph outputs must be F32 or I32")
                shape = [t.ne[d] for d in range(4)]
                out = np.empty(shape[::-1], dtype=np.float32 if t.type == g.GGML_TYPE_F32 else np.int32)
                dst = out.view(np.uint8).reshape(-1)
                g.ggml_backend_tensor_get(t, &dst[0], 0, dst.shape[0])
                while out.ndim > 1 and out.shape[0] == 1:
                    out = out[0]
                res.append(out)
            return res
        finally:
            g.ggml_backend_sched_free(sched)
