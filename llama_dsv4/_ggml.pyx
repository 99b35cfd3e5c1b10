# cython: language_level=3, boundscheck=False, cdivision=True
"""The Cython layer over ggml: devices and backends (through ggml's registry, so the same extension runs on
CPU, CUDA and Metal builds of libggml), model weights mapped zero-copy from GGUF files, quantization, and a
small op-graph runner used to check our kernels against numpy.

Everything that comes from a file is checked here again before ggml sees it (ggml asserts abort the process).
"""
import operator
import os

import numpy as np

cimport ggml as g
cimport dsv4_ops as k
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from libc.stdio cimport fflush, fputs, stderr
from libc.errno cimport EINTR, errno
from libc.stdlib cimport calloc, free
from posix.types cimport off_t
from posix.unistd cimport pread

# ---------------------------------------------------------------------------------------------- logging

cdef int _log_threshold = g.GGML_LOG_LEVEL_WARN
cdef int _log_last = g.GGML_LOG_LEVEL_NONE

cdef void _log_cb(g.ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_last
    cdef int lvl = <int> level
    if lvl == g.GGML_LOG_LEVEL_CONT:
        lvl = _log_last
    else:
        _log_last = lvl
    if lvl >= _log_threshold and text != NULL:
        fputs(text, stderr)
        fflush(stderr)

_LEVELS = {"debug": g.GGML_LOG_LEVEL_DEBUG, "info": g.GGML_LOG_LEVEL_INFO, "warn": g.GGML_LOG_LEVEL_WARN,
           "error": g.GGML_LOG_LEVEL_ERROR, "none": 99}


def set_log_level(str level):
    """ggml's own messages at or above `level` (debug, info, warn, error, none) go to stderr."""
    global _log_threshold
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}")
    _log_threshold = _LEVELS[level]


g.ggml_log_set(_log_cb, NULL)
set_log_level(os.environ.get("LLAMA_DSV4_GGML_LOG", "warn"))

# ---------------------------------------------------------------------------------------------- types

GGML_TYPE_COUNT = g.GGML_TYPE_COUNT


def type_traits(int type_id):
    """(name, block size, bytes per block, is_quantized) of a ggml type, or None for an unknown/removed id."""
    if type_id < 0 or type_id >= g.GGML_TYPE_COUNT:
        return None
    cdef const g.ggml_type_traits * tr = g.ggml_get_type_traits(<g.ggml_type> type_id)
    if tr == NULL or tr.blck_size <= 0 or tr.type_size == 0 or tr.type_name == NULL:
        return None
    return (tr.type_name.decode(), int(tr.blck_size), int(tr.type_size), bool(tr.is_quantized))


cdef const g.ggml_type_traits * _traits(int type_id) except NULL:
    if type_traits(type_id) is None:
        raise ValueError(f"unknown ggml type id {type_id}")
    return g.ggml_get_type_traits(<g.ggml_type> type_id)


GEMM_ISAS = {"off": k.DSV4_GEMM_OFF, "scalar": k.DSV4_GEMM_SCALAR, "avx2": k.DSV4_GEMM_AVX2,
             "avx512": k.DSV4_GEMM_AVX512, "vnni": k.DSV4_GEMM_VNNI}


def gemm_isa(str name="auto"):
    """The instruction set of our prompt-processing products (kernels/dsv4_gemm.h): "auto" = the best this CPU
    runs; "off" (0) = ggml's. "vnni" also replaces ggml's dense Q8_0 products. ValueError for an unknown name or
    one this CPU cannot run."""
    if name == "auto":
        return k.dsv4_gemm_isa_best()
    if name not in GEMM_ISAS:
        raise ValueError(f"unknown GEMM instruction set {name!r}; expected auto or one of {sorted(GEMM_ISAS)}")
    isa = GEMM_ISAS[name]
    if isa != k.DSV4_GEMM_OFF and not k.dsv4_gemm_isa_supported(isa):
        raise ValueError(f"this CPU cannot run the {name} GEMM kernels")
    return isa


def read_strings(buf, size_t pos, size_t n):
    """GGUF string array: n strings (u64 little-endian length, UTF-8 bytes) from byte `pos` of `buf`.

    Returns (strings, end, None) or, at the first bad string, (None, i, reason) with reason "truncated" (no room for
    its length), ("claims", length) (longer than the rest of the buffer) or "utf-8"."""
    cdef const uint8_t[::1] b = memoryview(buf).cast("B")
    cdef size_t size = b.shape[0], i, ln
    cdef int k
    out = []
    for i in range(n):
        if pos > size or size - pos < 8:
            return None, i, "truncated"
        ln = 0
        for k in range(8):
            ln |= (<size_t> b[pos + k]) << (8 * k)
        pos += 8
        if ln > size - pos:
            return None, i, ("claims", ln)
        if ln == 0:
            out.append("")
            continue
        try:
            out.append(PyUnicode_DecodeUTF8(<const char *> &b[pos], ln, "strict"))
        except UnicodeDecodeError:
            return None, i, "utf-8"
        pos += ln
    return out, pos, None


# the types ggml_quantize_chunk writes (any other id aborts the process inside ggml): F32, F16, BF16, the legacy
# 32-blocks, the K- and IQ-quants, the ternary and FP4 types
QUANTIZE_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35,
                            39, 40, 41, 42})


def quantize(rows, int type_id, imatrix=None):
    """Quantize a 2-D float32 array (rows x n_per_row) to `type_id` with ggml; returns uint8 [rows, row_bytes].

    imatrix: None, or the importance of each column (float32, n_per_row values, finite and >= 0) that ggml's
    quantizers weigh the rounding error with, the same for every row; required by the types for which
    ggml_quantize_requires_imatrix is true (IQ2_XXS, IQ2_XS, IQ1_S)."""
    cdef const g.ggml_type_traits * tr = _traits(type_id)
    if type_id not in QUANTIZE_TYPES:
        raise ValueError(f"ggml cannot quantize to {tr.type_name.decode()}")
    arr = np.ascontiguousarray(rows, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"quantize expects a non-empty 2-D array, got shape {arr.shape}")
    cdef int64_t nrows = arr.shape[0], n_per_row = arr.shape[1]
    if n_per_row % tr.blck_size != 0:
        raise ValueError(f"{tr.type_name.decode()} needs rows that are a multiple of {tr.blck_size}, "
                         f"got {n_per_row}")
    cdef const float[::1] qw
    cdef const float * qw_ptr = NULL
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n_per_row,) or not (np.isfinite(imat).all() and (imat >= 0).all()):
            raise ValueError(f"the importance matrix must be {n_per_row} finite values >= 0, got shape {imat.shape}")
        qw = imat
        qw_ptr = &qw[0]
    elif g.ggml_quantize_requires_imatrix(<g.ggml_type> type_id):
        raise ValueError(f"{tr.type_name.decode()} needs an importance matrix")
    cdef size_t row_bytes = g.ggml_row_size(<g.ggml_type> type_id, n_per_row)
    out = np.empty((nrows, row_bytes), dtype=np.uint8)
    cdef const float[:, ::1] src = arr
    cdef uint8_t[:, ::1] dst = out
    cdef size_t written
    with nogil:
        written = g.ggml_quantize_chunk(<g.ggml_type> type_id, &src[0, 0], &dst[0, 0], 0, nrows, n_per_row, qw_ptr)
    if written != nrows * row_bytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {nrows * row_bytes}")
    return out


def dequantize(raw, int type_id, int64_t n):
    """Convert `n` elements of type `type_id` stored in `raw` (bytes-like) to a float32 vector."""
    cdef const g.ggml_type_traits * tr = _traits(type_id)
    if n < 0 or n % tr.blck_size != 0:
        raise ValueError(f"{n} elements is not a whole number of {tr.type_name.decode()} blocks")
    cdef const uint8_t[::1] src = np.frombuffer(raw, dtype=np.uint8)
    cdef size_t need = g.ggml_row_size(<g.ggml_type> type_id, n)
    if <size_t> src.shape[0] != need:
        raise ValueError(f"{n} elements of {tr.type_name.decode()} take {need} bytes, got {src.shape[0]}")
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    cdef float[::1] dst = out
    if type_id == g.GGML_TYPE_F32:
        out[:] = np.frombuffer(raw, dtype=np.float32)
        return out
    if tr.to_float == NULL:
        raise ValueError(f"ggml cannot convert {tr.type_name.decode()} to float")
    with nogil:
        tr.to_float(&src[0], &dst[0], n)
    return out

# ---------------------------------------------------------------------------------------------- devices


_DEV_TYPES = {g.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", g.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
              g.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", g.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}


cdef dict _dev_props(g.ggml_backend_dev_t dev):
    """A device's name, description, type and memory, as devices() and Backends.device_info() give them."""
    cdef g.ggml_backend_dev_props props
    g.ggml_backend_dev_get_props(dev, &props)
    return {
        "name": props.name.decode() if props.name else "",
        "description": props.description.decode() if props.description else "",
        "type": _DEV_TYPES.get(props.type, str(props.type)),
        "memory_free": int(props.memory_free),
        "memory_total": int(props.memory_total),
        "buffer_from_host_ptr": bool(props.caps.buffer_from_host_ptr),
    }


def devices():
    """The devices of this libggml build, from ggml's backend registry."""
    return [_dev_props(g.ggml_backend_dev_get(i)) for i in range(g.ggml_backend_dev_count())]


def registered_backends():
    """The backends this libggml registered and how many devices each found ({name: devices}): a CUDA build on a
    machine without a GPU or driver has {"CUDA": 0, "CPU": 1}."""
    cdef g.ggml_backend_reg_t reg
    out = {}
    for i in range(g.ggml_backend_reg_count()):
        reg = g.ggml_backend_reg_get(i)
        out[g.ggml_backend_reg_name(reg).decode()] = g.ggml_backend_reg_dev_count(reg)
    return out


def idle_accelerators():
    """The backends besides the CPU, RPC and BLAS that this libggml has but that found no device (a CUDA build on a
    machine with no NVIDIA GPU or driver): what "auto" passes over, for a note."""
    return [name for name, n in registered_backends().items() if n == 0 and name not in ("CPU", "RPC", "BLAS")]


cdef g.ggml_backend_dev_t _dev_by_name(str name) except NULL:
    """A device of the registry by its name (any case: "cpu" is "CPU"); ValueError naming the ones there are."""
    names = [d["name"] for d in devices()]
    lowered = [n.lower() for n in names]
    if name.lower() not in lowered:
        raise ValueError(f"unknown device {name!r}; this build has {names}")
    return g.ggml_backend_dev_get(lowered.index(name.lower()))


cdef g.ggml_backend_dev_t _dev_by_type(g.ggml_backend_dev_type t) noexcept:
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_kind(dev) == t:
            return dev
    return NULL


# ---------------------------------------------------------------------------------------------- RPC

# The one command that gives this package ggml's RPC backend (README, "Beyond one machine"): the pinned ggml built
# from its sdist with RPC on. The PyPI wheel of libggml-python has none.
RPC_INSTALL = ('CMAKE_ARGS="-DGGML_RPC=ON -DGGML_NATIVE=ON" pip install --force-reinstall --no-binary libggml-python '
               '"libggml-python==0.20.2.post1" && pip install .')

ctypedef g.ggml_backend_reg_t (*_rpc_add_server_t)(const char * endpoint) noexcept nogil
ctypedef void (*_rpc_start_server_t)(const char * endpoint, const char * cache_dir, size_t n_threads,
                                     size_t n_devices, g.ggml_backend_dev_t * devices) noexcept nogil


cdef void * _rpc_proc(const char * name) except NULL:
    """An entry point of ggml's RPC backend, found through the backend registry (so this extension links and runs
    against a libggml without RPC); RuntimeError naming the install that has it."""
    cdef g.ggml_backend_reg_t reg = g.ggml_backend_reg_by_name(b"RPC")
    cdef void * fn = g.ggml_backend_reg_get_proc_address(reg, name) if reg != NULL else NULL
    if fn == NULL:
        raise RuntimeError("this libggml has no RPC backend (the PyPI wheel of libggml-python is built without it); "
                           f"install the RPC-enabled build: {RPC_INSTALL}")
    return fn


def rpc_available():
    """Whether this libggml has ggml's RPC backend."""
    return g.ggml_backend_reg_by_name(b"RPC") != NULL


def rpc_serve(str endpoint, str cache_dir=None, int n_threads=1, str device="cpu"):
    """Serve this machine's `device` to RPC clients at endpoint ("host:port") with ggml's RPC server, caching large
    tensors under cache_dir (None: no cache). Blocks until the server fails to start or to accept (it returns
    then); the protocol has no authentication. n_threads: the CPU backend's threads."""
    cdef _rpc_start_server_t start = <_rpc_start_server_t> _rpc_proc(b"ggml_backend_rpc_start_server")
    cdef g.ggml_backend_dev_t dev = _dev_by_name(device)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    cdef bytes ep = endpoint.encode()
    cdef bytes cd = cache_dir.encode() if cache_dir else b""
    cdef const char * ep_c = ep
    cdef const char * cd_c = NULL
    if cache_dir:
        cd_c = cd
    cdef size_t nt = n_threads
    with nogil:
        start(ep_c, cd_c, nt, 1, &dev)


cdef list _rpc_devices(list endpoints):
    """The devices of each RPC server, in order (ggml connects to each and asks; None-free or RuntimeError)."""
    cdef _rpc_add_server_t add = <_rpc_add_server_t> _rpc_proc(b"ggml_backend_rpc_add_server")
    cdef g.ggml_backend_reg_t reg
    cdef bytes ep
    cdef const char * ep_c
    out = []
    for endpoint in endpoints:
        ep = endpoint.encode()
        ep_c = ep
        with nogil:
            reg = add(ep_c)
        if reg == NULL or g.ggml_backend_reg_dev_count(reg) == 0:
            raise ConnectionError(f"RPC server {endpoint} cannot be reached (is llama-dsv4-rpc-server running "
                                  "there, and the address host:port right?)")
        for i in range(g.ggml_backend_reg_dev_count(reg)):
            out.append(<uintptr_t> g.ggml_backend_reg_dev_get(reg, i))
    return out


def rpc_connect(endpoints):
    """Connect to each RPC server ("host:port") and ask for its devices (ggml keeps the connections for the
    backends made next); their names. ConnectionError for a server that cannot be reached."""
    return [g.ggml_backend_dev_name(<g.ggml_backend_dev_t> <uintptr_t> d).decode() for d in _rpc_devices(list(endpoints))]


cdef class Backends:
    """The compute backends of one engine: the RPC devices (rpc), then the chosen local device, the CPU last (the
    scheduler's fallback).

    device: "auto" (the first GPU if the build has one, else the CPU), "cpu", or a device name from devices().
    n_threads: the size of the CPU backend's thread pool (<= 0: the usable CPUs), at most the CPUs this process
    may use (engine/cpus.py); the pool is made once and each compute uses `threads` of it (set_threads).
    poll: how long idle pool threads spin for the next graph before they sleep (ggml's threadpool `poll`, 0-100;
    None: POLL).
    rpc: "host:port" endpoints of RPC servers (llama-dsv4-rpc-server) whose devices take a share of the layers
    (layer_devices); needs the RPC-enabled libggml (RPC_INSTALL).
    tensor_split: the shares of the layers per split device (the RPC devices in order, then the local one), as
    llama.cpp's --tensor-split; None: in proportion to the devices' free memory.
    portable: only ggml's own ops in the graph (none of our CPU kernels), as a graph with RPC devices has; a CPU
    run with portable=True computes exactly what a split run computes.
    """

    POLL = 0  # idle threads sleep at once: see docs/design.md, "Threads"

    def __cinit__(self, str device="auto", n_threads=0, poll=None, rpc=(), tensor_split=None, bint portable=False):
        from .engine.cpus import usable_cpus

        cdef g.ggml_backend_dev_t cpu = _dev_by_type(g.GGML_BACKEND_DEVICE_TYPE_CPU)
        cdef g.ggml_backend_dev_t main = NULL
        if cpu == NULL:
            raise RuntimeError("this libggml build has no CPU device")
        if device == "auto":
            main = _dev_by_type(g.GGML_BACKEND_DEVICE_TYPE_GPU)
            if main == NULL:
                main = _dev_by_type(g.GGML_BACKEND_DEVICE_TYPE_IGPU)
        elif device != "cpu":
            main = _dev_by_name(device)
            if main == cpu:
                main = NULL
        requested = operator.index(n_threads)
        cpus = usable_cpus()
        cdef int size = cpus if requested <= 0 else min(requested, cpus)
        cdef int poll_level = self.POLL if poll is None else operator.index(poll)
        if not 0 <= poll_level <= 100:
            raise ValueError(f"poll must be in [0, 100], got {poll_level}")
        rpc = list(rpc)
        remote = _rpc_devices(rpc) if rpc else []
        self.n_rpc = len(remote)
        self.portable = portable or self.n_rpc > 0
        self.n = self.n_rpc + (2 if main != NULL else 1)
        self.backends = <g.ggml_backend_t *> calloc(self.n, sizeof(g.ggml_backend_t))
        self.devs = <g.ggml_backend_dev_t *> calloc(self.n, sizeof(g.ggml_backend_dev_t))
        if self.backends == NULL or self.devs == NULL:
            raise MemoryError()
        for i in range(self.n_rpc):
            self.devs[i] = <g.ggml_backend_dev_t> <uintptr_t> remote[i]
        if main != NULL:
            self.devs[self.n_rpc] = main
        self.devs[self.n - 1] = cpu
        self.tensor_split = None
        if tensor_split is not None:
            shares = [float(x) for x in tensor_split]
            if len(shares) > self.n_rpc + 1 or any(not x >= 0 for x in shares) or not sum(shares) > 0:
                raise ValueError(f"tensor_split must be at most {self.n_rpc + 1} non-negative shares (the RPC devices, "
                                 f"then the local one) with a positive sum, got {list(tensor_split)}")
            self.tensor_split = shares + [0.0] * (self.n_rpc + 1 - len(shares))
        self.bufts = <g.ggml_backend_buffer_type_t *> calloc(self.n, sizeof(g.ggml_backend_buffer_type_t))
        if self.bufts == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.backends[i] = g.ggml_backend_dev_init(self.devs[i], NULL)
            if self.backends[i] == NULL:
                raise RuntimeError(f"ggml could not start the backend of device "
                                   f"{g.ggml_backend_dev_name(self.devs[i]).decode()}")
            # compute buffers on an RPC device: through a view that keeps the server's answers about allocation
            # sizes (kernels/dsv4_rpc_buft.h), else a round trip per attention and MoE node of every graph
            self.bufts[i] = k.dsv4_rpc_buft_new(g.ggml_backend_get_default_buffer_type(self.backends[i])) \
                if i < self.n_rpc else NULL
        self.view_flags = [self.bufts[i] != NULL for i in range(self.n)]
        for i in range(self.n):
            if self.bufts[i] == NULL:
                self.bufts[i] = g.ggml_backend_get_default_buffer_type(self.backends[i])
        # one persistent pool for the CPU backend, made here once: its threads live across graph computes (ggml
        # otherwise starts and joins them on every compute); a compute uses the first `threads` of them
        cdef g.ggml_threadpool_params tpp = g.ggml_threadpool_params_default(size)
        tpp.poll = poll_level
        self.pool = g.ggml_threadpool_new(&tpp)
        if self.pool == NULL:
            raise RuntimeError(f"ggml could not start a pool of {size} threads")
        g.ggml_backend_cpu_set_threadpool(self.backends[self.n - 1], self.pool)
        self.pool_size = size
        self.set_threads(size)
        self._thread_ids = self._pool_thread_ids() if size > 1 else []

    def layer_devices(self, int n_layer):
        """The backend index (in `names`) of each of n_layer layers: contiguous runs over the split devices (the RPC
        devices in order, then the local device), as tensor_split says or else in proportion to each device's free
        memory (llama.cpp's rule); all local without RPC."""
        home = self.n_rpc  # the local device: the GPU if any, else the CPU
        if self.n_rpc == 0:
            return [home] * n_layer
        shares = self.tensor_split
        if shares is None:
            shares = [float(d["memory_free"]) for d in self.device_info()[: self.n_rpc + 1]]
        total = sum(shares)
        bounds, acc = [], 0.0
        for x in shares:
            acc += x
            bounds.append(acc / total)
        out = []
        for il in range(n_layer):
            pos = (il + 0.5) / n_layer
            out.append(next(i for i, b in enumerate(bounds) if pos < b or i == len(bounds) - 1))
        return out

    def device_info(self):
        """Name, description, type and memory of each backend's device, in backend order."""
        return [_dev_props(self.devs[i]) for i in range(self.n)]

    def alloc_size_stats(self):
        """(answered from the cache, asked of the servers): the allocation sizes the schedulers asked for on RPC
        devices since these backends were made (kernels/dsv4_rpc_buft.h); (0, 0) without RPC."""
        cdef size_t h = 0, m = 0, hi, mi
        for i, view in enumerate(self.view_flags):
            if view:
                k.dsv4_rpc_buft_stats(self.bufts[i], &hi, &mi)
                h += hi
                m += mi
        return int(h), int(m)

    @property
    def n_remote(self):
        """The RPC devices among the backends (the first n_remote)."""
        return self.n_rpc

    @property
    def is_portable(self):
        """Whether graphs on these backends use ggml's ops only (RPC devices, or portable=True)."""
        return self.portable

    def __dealloc__(self):
        if self.bufts != NULL:
            for i, view in enumerate(self.view_flags or []):
                if view:
                    k.dsv4_rpc_buft_free(self.bufts[i])
            free(self.bufts)
        if self.backends != NULL:
            for i in range(self.n):
                if self.backends[i] != NULL:
                    g.ggml_backend_free(self.backends[i])
            free(self.backends)
        free(self.devs)
        if self.pool != NULL:
            g.ggml_threadpool_free(self.pool)

    def set_threads(self, int n_threads):
        """How many of the pool's threads the next computes use (1 ... pool_threads), on every backend that has a
        thread count (CPU, BLAS), through the registry. Cheap: the pool stays."""
        if n_threads < 1 or n_threads > self.pool_size:
            raise ValueError(f"n_threads must be >= 1 and at most the pool's {self.pool_size}, got {n_threads}")
        cdef g.ggml_backend_set_n_threads_t fn
        for i in range(self.n):
            reg = g.ggml_backend_dev_backend_reg(self.devs[i])
            fn = <g.ggml_backend_set_n_threads_t> g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
            if fn != NULL:
                fn(self.backends[i], n_threads)
        # one thread: no pool (ggml then computes on the calling thread alone and the pool stays paused), so the
        # pool's sleeping threads are not woken at every compute only to sleep again (on a busy machine each wake
        # competes for a CPU: single-thread decode next to 2 busy processes on 2 CPUs was 25% faster without)
        g.ggml_backend_cpu_set_threadpool(self.backends[self.n - 1], self.pool if n_threads > 1 else NULL)
        self.n_threads = n_threads

    cdef list _pool_thread_ids(self):
        """Run one graph on every pool thread, each writing its kernel thread id (kernels/dsv4_threads.c)."""
        cdef g.ggml_init_params ip
        ip.mem_size = 4 * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(8, False) + 4 * self.pool_size + 256
        ip.mem_buffer = NULL
        ip.no_alloc = False
        cdef g.ggml_context * ctx = g.ggml_init(ip)
        if ctx == NULL:
            raise MemoryError()
        cdef g.ggml_tensor * t
        cdef g.ggml_cgraph * gf
        cdef g.ggml_status st
        cdef int32_t * ids
        try:
            t = k.dsv4_thread_ids(ctx, self.pool_size)
            gf = g.ggml_new_graph_custom(ctx, 8, False)
            g.ggml_build_forward_expand(gf, t)
            ids = <int32_t *> t.data
            for i in range(self.pool_size):
                ids[i] = -1
            with nogil:
                st = g.ggml_backend_graph_compute(self.backends[self.n - 1], gf)
            if st != g.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"graph compute failed with status {<int> st}")
            return [int(ids[i]) for i in range(self.pool_size)]
        finally:
            g.ggml_free(ctx)

    cdef g.ggml_backend_dev_t primary_dev(self):
        """The local device (the GPU if any, else the CPU)."""
        return self.devs[self.n_rpc]

    cdef g.ggml_backend_dev_t dev_at(self, int i):
        return self.devs[i]

    @property
    def names(self):
        return [g.ggml_backend_name(self.backends[i]).decode() for i in range(self.n)]

    @property
    def threads(self):
        """The threads the next computes use (set_threads)."""
        return self.n_threads

    @property
    def pool_threads(self):
        """The threads of the CPU backend's pool (including the thread that calls compute)."""
        return self.pool_size

    @property
    def worker_ids(self):
        """Kernel thread ids of the pool's own threads, in ggml's task order: worker_ids[i] runs task i + 1 (task
        0 runs on the thread that calls compute). Empty where the system has no thread ids."""
        ids = self._thread_ids[1:]
        return ids if all(t > 0 for t in ids) else []


_default_backends = None


def default_backends():
    """A process-wide CPU Backends object for small computations (tests, tools)."""
    global _default_backends
    if _default_backends is None:
        _default_backends = Backends("cpu")
    return _default_backends

# ---------------------------------------------------------------------------------------------- weights


cdef enum:
    _READ_CHUNK = 64 << 20  # bytes per read into a staging buffer for a device that cannot read host memory


cdef int _pread_all(int fd, uint8_t * dst, size_t n, size_t offset) noexcept nogil:
    """Read n bytes at offset into dst; 0, or -1 for a short read (the file ended), or errno."""
    cdef ssize_t got
    while n > 0:
        got = pread(fd, dst, n, <off_t> offset)
        if got < 0:
            if errno == EINTR:
                continue
            return errno
        if got == 0:
            return -1
        dst += got
        n -= <size_t> got
        offset += <size_t> got
    return 0


cdef bint _can_map(g.ggml_backend_dev_t dev) noexcept:
    """Whether a device computes on host memory it is given (ggml_backend_dev_buffer_from_host_ptr)."""
    cdef g.ggml_backend_dev_props props
    g.ggml_backend_dev_get_props(dev, &props)
    return props.type == g.GGML_BACKEND_DEVICE_TYPE_CPU or props.caps.buffer_from_host_ptr


cdef g.ggml_tensor * _new_tensor(g.ggml_context * ctx, str name, type_id, shape, dict taken) except NULL:
    """A named tensor of ctx (no data) after checking what a file or a caller gives: the name (not empty, not too
    long, not in `taken`), the type, the shape (1-4 positive dimensions, ggml order) and its first dimension against
    the type's block size."""
    bname = name.encode()
    if not 0 < len(bname) < g.GGML_MAX_NAME:
        raise ValueError(f"tensor name {name!r} is empty or longer than {g.GGML_MAX_NAME - 1} bytes")
    if name in taken:
        raise ValueError(f"duplicate tensor {name!r}")
    cdef const g.ggml_type_traits * tr = _traits(type_id)
    if not 1 <= len(shape) <= 4 or any(d <= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape}")
    if shape[0] % tr.blck_size:
        raise ValueError(f"tensor {name!r}: ne0={shape[0]} is not a multiple of {tr.blck_size}")
    cdef int64_t ne[4]
    for d in range(4):
        ne[d] = shape[d] if d < len(shape) else 1
    cdef g.ggml_tensor * t = g.ggml_new_tensor(ctx, <g.ggml_type> type_id, len(shape), ne)
    if t == NULL:
        raise MemoryError()
    g.ggml_set_name(t, bname)
    return t


cdef _check_range(g.ggml_tensor * t, str name, size_t offset, size_t n):
    """ValueError unless bytes [offset, offset + n) lie inside t's data."""
    cdef size_t total = g.ggml_nbytes(t)
    if offset > total or n > total - offset:
        raise ValueError(f"tensor {name!r}: bytes [{offset}, {offset + n}) lie outside its {total}")


cdef class WeightMap:
    """Model tensors as ggml tensors, their data either pages of the memory-mapped GGUF shards or memory allocated
    for them on the device and filled from the files.

    tensors: (name, ggml type id, ne tuple in ggml order, shard index, absolute byte offset, nbytes).
    maps:    (use_mmap) one object per shard exporting a read-only buffer of the whole file (an mmap.mmap). On the
             CPU, and on devices that can wrap host memory, the tensors point into the mapping: nothing is copied,
             pages are read on first use. Other devices get a device buffer and a copy of each tensor.
    files:   (use_mmap=False) instead of maps, one open file descriptor per shard: every tensor is read (pread)
             into memory allocated on the device (on the CPU: host memory this process owns), so nothing refers
             to the files afterwards.
    private: name -> bytes: tensors whose data are these bytes, never the file (the loader's validated copies of
             the tensors the graph uses as indices): a later change of the file cannot reach them.
    """

    def __cinit__(self, tensors, Backends backends=None, *, maps=None, files=None, private=None, placement=None):
        self._views = []
        self._index = {}
        self._names = []
        self._owned = frozenset()
        if (maps is None) == (files is None):
            raise ValueError("give the shards either as maps or as files")
        private = dict(private or {})
        backends = backends or default_backends()
        cdef const uint8_t[::1] mv
        sizes = []
        for s in maps or []:
            mv = s
            self._views.append(mv)
            sizes.append(mv.shape[0])
        for fd in files or []:
            sizes.append(os.fstat(fd).st_size)
        if any(n == 0 for n in sizes):
            raise ValueError("cannot load an empty file")
        cdef size_t n_t = len(tensors)
        home = backends.n_rpc
        dev_of = [home] * n_t if placement is None else [operator.index(d) for d in placement]
        if len(dev_of) != n_t or any(not 0 <= d < backends.n for d in dev_of):
            raise ValueError(f"placement: one backend index (0 ... {backends.n - 1}) per tensor")
        self._tensors = <g.ggml_tensor **> calloc(max(n_t, <size_t> 1), sizeof(g.ggml_tensor *))
        self.n_ctxs = backends.n
        self.ctxs = <g.ggml_context **> calloc(self.n_ctxs, sizeof(g.ggml_context *))
        if self._tensors == NULL or self.ctxs == NULL:
            raise MemoryError()
        cdef g.ggml_init_params ip
        ip.mem_buffer = NULL
        ip.no_alloc = True
        for d in set(dev_of) | {home}:
            ip.mem_size = (dev_of.count(d) + 1) * g.ggml_tensor_overhead()
            self.ctxs[<int> d] = g.ggml_init(ip)
            if self.ctxs[<int> d] == NULL:
                raise MemoryError("ggml_init failed")
        self.ctx = self.ctxs[home]
        cdef g.ggml_tensor * t
        for i, (name, type_id, shape, shard, offset, nbytes) in enumerate(tensors):
            t = _new_tensor(self.ctxs[<int> dev_of[i]], name, type_id, shape, self._index)
            if not 0 <= shard < len(sizes):
                raise ValueError(f"tensor {name!r}: shard {shard} does not exist")
            if g.ggml_nbytes(t) != <size_t> nbytes:
                raise ValueError(f"tensor {name!r}: {nbytes} bytes given, its shape and type need {g.ggml_nbytes(t)}")
            if offset < 0 or offset + nbytes > sizes[shard]:
                raise ValueError(f"tensor {name!r}: data [{offset}, {offset + nbytes}) lies outside its file")
            if name in private and len(memoryview(private[name]).cast("B")) != nbytes:
                raise ValueError(f"tensor {name!r}: its private copy is not {nbytes} bytes")
            self._tensors[i] = t
            self._index[name] = i
            self._names.append(name)
        self._place(tensors, backends, files, private, dev_of)

    cdef _place(self, tensors, Backends backends, files, dict private, list dev_of):
        cdef int home = backends.n_rpc
        cdef g.ggml_backend_dev_t dev = backends.primary_dev()
        self.device = g.ggml_backend_dev_name(dev).decode()
        cdef const uint8_t[::1] mv
        cdef size_t max_t
        cdef g.ggml_backend_buffer_t buf
        n_shards = len(self._views)
        # a device that can wrap host memory (the CPU, or caps.buffer_from_host_ptr) reads its tensors in place from
        # the mappings; the CPU may hold a share beside another local device (the experts with hot experts on it)
        mapping = [files is None and _can_map(backends.dev_at(d)) for d in range(backends.n)]
        self.zero_copy = mapping[home]
        self.n_bufs = n_shards * backends.n + backends.n  # per device: its mappings, then memory allocated on it
        self.bufs = <g.ggml_backend_buffer_t *> calloc(self.n_bufs, sizeof(g.ggml_backend_buffer_t))
        if self.bufs == NULL:
            raise MemoryError()
        for d in sorted(set(dev_of)):
            if not mapping[d]:
                continue
            mine = [i for i in range(len(tensors)) if dev_of[i] == d and tensors[i][0] not in private]
            for s in sorted({tensors[i][3] for i in mine}):
                mv = self._views[s]
                max_t = max([tensors[i][5] for i in mine if tensors[i][3] == s], default=1)
                buf = g.ggml_backend_dev_buffer_from_host_ptr(backends.dev_at(d), <void *> &mv[0], mv.shape[0], max_t)
                if buf == NULL:
                    raise RuntimeError(f"{g.ggml_backend_dev_name(backends.dev_at(d)).decode()} could not map the "
                                       "model file into a buffer")
                self.bufs[d * n_shards + s] = buf
                g.ggml_backend_buffer_set_usage(buf, g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            for i in mine:
                name, _, _, shard, offset, _ = tensors[i]
                mv = self._views[shard]
                if g.ggml_backend_tensor_alloc(self.bufs[d * n_shards + shard], self._tensors[i],
                                               <void *> (&mv[0] + <size_t> offset)) != g.GGML_STATUS_SUCCESS:
                    raise RuntimeError(f"ggml could not place tensor {name!r}")
        # every tensor not placed in a mapping: memory allocated on its device (ggml pads and aligns each tensor as
        # the device needs), filled from the private copies, the files or the mappings
        self._owned = frozenset(name for i, (name, *_) in enumerate(tensors)
                                if not mapping[dev_of[i]] or name in private)
        cdef g.ggml_backend_buffer_t own
        cdef g.ggml_tensor * t
        for d in range(backends.n):
            if self.ctxs[d] == NULL:
                continue
            need = sum(nb for i, (name, _, _, _, _, nb) in enumerate(tensors) if dev_of[i] == d and name in self._owned)
            if not need:
                continue
            own = g.ggml_backend_alloc_ctx_tensors_from_buft(self.ctxs[d], g.ggml_backend_dev_buffer_type(backends.dev_at(d)))
            if own == NULL:
                raise MemoryError(f"{g.ggml_backend_dev_name(backends.dev_at(d)).decode()} could not allocate {need} "
                                  "bytes for the model weights")
            self.bufs[n_shards * backends.n + d] = own
            g.ggml_backend_buffer_set_usage(own, g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            for i, (name, _, _, shard, offset, nb) in enumerate(tensors):
                t = self._tensors[i]
                if dev_of[i] != d or name not in self._owned:
                    continue
                if name in private:
                    mv = memoryview(private[name]).cast("B")
                    g.ggml_backend_tensor_set(t, &mv[0], 0, <size_t> nb)
                elif files is None:
                    mv = self._views[shard]
                    g.ggml_backend_tensor_set(t, &mv[<size_t> offset], 0, <size_t> nb)
                else:
                    self._read(t, files[shard], offset)
        if not any(mapping[d] for d in set(dev_of)):
            self._views = []  # nothing points into the mappings: they may be closed

    cdef _read(self, g.ggml_tensor * t, int fd, size_t offset):
        """Fill tensor t from the file: straight into host memory, else through a staging buffer."""
        cdef size_t n = g.ggml_nbytes(t), done = 0, k
        cdef int err = 0
        cdef uint8_t[::1] stage
        if g.ggml_backend_buffer_is_host(t.buffer):
            with nogil:
                err = _pread_all(fd, <uint8_t *> t.data, n, offset)
        else:
            stage = np.empty(min(n, <size_t> _READ_CHUNK), np.uint8)
            while done < n and err == 0:
                k = min(n - done, <size_t> stage.shape[0])
                with nogil:
                    err = _pread_all(fd, &stage[0], k, offset + done)
                if err == 0:
                    g.ggml_backend_tensor_set(t, &stage[0], done, k)
                done += k
        if err == -1:
            raise ValueError(f"tensor {t.name.decode()!r}: the file ended before its data (changed while loading?)")
        if err:
            raise OSError(err, f"reading tensor {t.name.decode()!r}: {os.strerror(err)}")

    def __dealloc__(self):
        if self.bufs != NULL:
            for i in range(self.n_bufs):
                if self.bufs[i] != NULL:
                    g.ggml_backend_buffer_free(self.bufs[i])
            free(self.bufs)
        self._free_ctxs()
        free(self._tensors)

    cdef _free_ctxs(self):
        if self.ctxs != NULL:
            for i in range(self.n_ctxs):
                if self.ctxs[i] != NULL:
                    g.ggml_free(self.ctxs[i])
            free(self.ctxs)
            self.ctxs = NULL
        self.ctx = NULL

    def close(self):
        """Release the ggml tensors, their memory and the mapped views (the mmaps can be closed after this)."""
        if self.bufs != NULL:
            for i in range(self.n_bufs):
                if self.bufs[i] != NULL:
                    g.ggml_backend_buffer_free(self.bufs[i])
            free(self.bufs)
            self.bufs = NULL
        self._free_ctxs()
        self._index = {}
        self._names = []
        self._views = []

    cdef g.ggml_tensor * get(self, str name) except NULL:
        i = self._index.get(name)
        if i is None:
            raise KeyError(f"no tensor {name!r} in the model")
        return self._tensors[<int> i]

    def host_range(self, str name):
        """(address, nbytes) of a tensor's data when they lie in this process's memory: in the mapping of the model
        file (zero-copy placement) or in host memory allocated for them; None on a device. For mlock."""
        cdef g.ggml_tensor * t = self.get(name)
        if self.mapped(name) or g.ggml_backend_buffer_is_host(t.buffer):
            return (<size_t> t.data, g.ggml_nbytes(t))
        return None

    def mapped(self, str name):
        """Whether a tensor's data are pages of the model file's mapping (which madvise may hand back to the file)."""
        self.get(name)
        return name not in self._owned

    def __contains__(self, name):
        return name in self._index

    def __len__(self):
        return len(self._names)

    def names(self):
        return list(self._names)

    def info(self, str name):
        """(ggml type id, ne tuple, nbytes, data address) of a tensor."""
        cdef g.ggml_tensor * t = self.get(name)
        return (<int> t.type, tuple(t.ne[d] for d in range(4)), g.ggml_nbytes(t), <uintptr_t> t.data)

    def raw(self, str name):
        """The stored bytes of a tensor (a copy)."""
        cdef g.ggml_tensor * t = self.get(name)
        out = np.empty(g.ggml_nbytes(t), dtype=np.uint8)
        cdef uint8_t[::1] dst = out
        if dst.shape[0]:
            g.ggml_backend_tensor_get(t, &dst[0], 0, dst.shape[0])
        return out

    def numpy(self, str name):
        """A tensor as a numpy array in numpy order (reversed ne): float32 (dequantized) or int32."""
        cdef g.ggml_tensor * t = self.get(name)
        shape = tuple(t.ne[d] for d in range(4))
        while len(shape) > 1 and shape[-1] == 1:
            shape = shape[:-1]
        raw = self.raw(name)
        if t.type == g.GGML_TYPE_I32:
            return raw.view(np.int32).reshape(shape[::-1])
        return dequantize(raw, t.type, g.ggml_nelements(t)).reshape(shape[::-1])

    def read(self, str name, size_t offset, size_t n):
        """n bytes of a tensor's data from byte offset (a copy); ValueError outside the tensor."""
        return _read_bytes(self.get(name), name, offset, n)


cdef object _read_bytes(g.ggml_tensor * t, str name, size_t offset, size_t n):
    """n bytes of t's data from byte offset, wherever they are, as a uint8 array; ValueError outside the tensor."""
    _check_range(t, name, offset, n)
    out = np.empty(n, dtype=np.uint8)
    cdef uint8_t[::1] dst = out
    if n:
        g.ggml_backend_tensor_get(t, &dst[0], offset, n)
    return out


cdef class DeviceTensors:
    """Tensors the engine owns beside the model's weights (not from the file), in memory allocated on one backend's
    device: for example the hot experts' copies and their lookup rows (engine/hot_experts.py).

    specs: (name, ggml type id, ne tuple in ggml order) per tensor; backend: its index in backends. Zero-filled.
    """

    def __cinit__(self, Backends backends, int backend, specs):
        specs = list(specs)
        self._index = {}
        if not 0 <= backend < backends.n:
            raise ValueError(f"backend must be in [0, {backends.n}), got {backend}")
        cdef g.ggml_init_params ip
        ip.mem_buffer = NULL
        ip.no_alloc = True
        ip.mem_size = (len(specs) + 1) * g.ggml_tensor_overhead()
        self.ctx = g.ggml_init(ip)
        if self.ctx == NULL:
            raise MemoryError("ggml_init failed")
        self._tensors = <g.ggml_tensor **> calloc(max(len(specs), 1), sizeof(g.ggml_tensor *))
        if self._tensors == NULL:
            raise MemoryError()
        for i, (name, type_id, shape) in enumerate(specs):
            self._tensors[i] = _new_tensor(self.ctx, name, type_id, shape, self._index)
            self._index[name] = i
        dev = backends.dev_at(backend)
        self.device = g.ggml_backend_dev_name(dev).decode()
        self.buf = g.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, g.ggml_backend_dev_buffer_type(dev)) \
            if specs else NULL
        if specs and self.buf == NULL:
            need = sum(g.ggml_nbytes(self._tensors[i]) for i in range(len(specs)))
            raise MemoryError(f"{self.device} could not allocate {need} bytes")
        if self.buf != NULL:
            g.ggml_backend_buffer_clear(self.buf, 0)

    def __dealloc__(self):
        self.close()

    def close(self):
        """Release the tensors and their memory (nothing may compute with them afterwards)."""
        if self.buf != NULL:
            g.ggml_backend_buffer_free(self.buf)
            self.buf = NULL
        if self.ctx != NULL:
            g.ggml_free(self.ctx)
            self.ctx = NULL
        free(self._tensors)
        self._tensors = NULL
        self._index = {}

    cdef g.ggml_tensor * get(self, str name) except NULL:
        i = self._index.get(name)
        if i is None:
            raise KeyError(f"no tensor {name!r} here")
        return self._tensors[<int> i]

    @property
    def nbytes(self):
        """Bytes allocated on the device."""
        return g.ggml_backend_buffer_get_size(self.buf) if self.buf != NULL else 0

    def write(self, str name, size_t offset, data):
        """Copy the bytes of data into a tensor from byte offset; ValueError outside the tensor."""
        cdef g.ggml_tensor * t = self.get(name)
        cdef const uint8_t[::1] b = np.ascontiguousarray(np.frombuffer(data, np.uint8) if isinstance(data, bytes)
                                                         else np.asarray(data)).view(np.uint8).reshape(-1)
        cdef size_t n = b.shape[0]
        _check_range(t, name, offset, n)
        if n:
            g.ggml_backend_tensor_set(t, &b[0], offset, n)

    def read(self, str name, size_t offset=0, n=None):
        """Bytes of a tensor from byte offset (all the rest by default), as a uint8 array."""
        cdef g.ggml_tensor * t = self.get(name)
        cdef size_t total = g.ggml_nbytes(t)
        return _read_bytes(t, name, offset, total - min(offset, total) if n is None else <size_t> n)
