"""The ctypes types of llama-cpp-python's low-level API (`llama_cpp.llama_cpp`): scalar aliases, callback types, and
the structures callers fill or read field by field (llama_batch, llama_token_data_array, the parameter structs).

Nothing here is handed to a C library: the structures exist so that code written against llama.cpp's header sets
and reads the same field names. The parameter structs carry llama.cpp 0.3.36's fields; those llama-dsv4 has no use
for are accepted and ignored (lowlevel.py says which ones it reads).
"""

from __future__ import annotations

import ctypes

from ..engine.cpus import usable_cpus
from . import constants as _c

# scalar types (llama.h)
llama_token = ctypes.c_int32
llama_token_p = ctypes.POINTER(llama_token)
llama_pos = ctypes.c_int32
llama_seq_id = ctypes.c_int32
llama_state_seq_flags = ctypes.c_uint32

# opaque pointers: functions return them as ints (handles, see handles.py), as ctypes does for c_void_p results
llama_model_p = int
llama_vocab_p = int
llama_context_p = int
llama_memory_t = int
llama_sampler_p = int
llama_model_p_ctypes = ctypes.c_void_p
llama_vocab_p_ctypes = ctypes.c_void_p
llama_context_p_ctypes = ctypes.c_void_p
llama_memory_t_ctypes = ctypes.c_void_p
llama_sampler_p_ctypes = ctypes.c_void_p

# callbacks
ggml_log_callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
llama_log_callback = ggml_log_callback
llama_progress_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)
ggml_abort_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
ggml_backend_sched_eval_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


class llama_token_data(ctypes.Structure):
    """One candidate: token id, logit, probability."""

    _fields_ = [("id", llama_token), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


llama_token_data_p = ctypes.POINTER(llama_token_data)


class llama_token_data_array(ctypes.Structure):
    """Candidates a sampler works on: `data[0:size]`; `selected` is the index of the chosen one (-1: none yet)."""

    _fields_ = [
        ("data", llama_token_data_p),
        ("size", ctypes.c_size_t),
        ("selected", ctypes.c_int64),
        ("sorted", ctypes.c_bool),
    ]


llama_token_data_array_p = ctypes.POINTER(llama_token_data_array)


class llama_batch(ctypes.Structure):
    """Input of llama_decode: n_tokens tokens with their positions, sequence ids and output flags. Made by
    llama_batch_init (arrays owned by the batch) or llama_batch_get_one (the caller's tokens, the rest NULL)."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(llama_token)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(llama_pos)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(llama_seq_id))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


class llama_model_kv_override_value(ctypes.Union):
    _fields_ = [
        ("val_i64", ctypes.c_int64),
        ("val_f64", ctypes.c_double),
        ("val_bool", ctypes.c_bool),
        ("val_str", ctypes.c_char * 128),
    ]


class llama_model_kv_override(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_int), ("key", ctypes.c_char * 128), ("value", llama_model_kv_override_value)]


class llama_model_params(ctypes.Structure):
    """Model loading parameters (llama_model_default_params). llama-dsv4 reads vocab_only, load_mode (and the
    older use_mmap / use_mlock attributes, where a caller sets them)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.POINTER(ctypes.c_float)),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.POINTER(llama_model_kv_override)),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


class llama_sampler_seq_config(ctypes.Structure):
    _fields_ = [("seq_id", llama_seq_id), ("sampler", ctypes.c_void_p)]


class llama_context_params(ctypes.Structure):
    """Context parameters (llama_context_default_params). llama-dsv4 reads n_ctx, n_batch, n_ubatch, n_seq_max,
    n_threads, n_threads_batch, flash_attn_type, type_k, embeddings and rope_freq_base."""

    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_rs_seq", ctypes.c_uint32),
        ("n_outputs_max", ctypes.c_uint32),
        ("n_outputs_max_per_seq", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        ("ctx_type", ctypes.c_int),
        ("rope_scaling_type", ctypes.c_int),
        ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int),
        ("flash_attn_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", ctypes.c_void_p),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool),
        ("swa_full", ctypes.c_bool),
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.POINTER(llama_sampler_seq_config)),
        ("n_samplers", ctypes.c_size_t),
        ("ctx_other", ctypes.c_void_p),
    ]


class llama_perf_context_data(ctypes.Structure):
    _fields_ = [
        ("t_start_ms", ctypes.c_double),
        ("t_load_ms", ctypes.c_double),
        ("t_p_eval_ms", ctypes.c_double),
        ("t_eval_ms", ctypes.c_double),
        ("n_p_eval", ctypes.c_int32),
        ("n_eval", ctypes.c_int32),
        ("n_reused", ctypes.c_int32),
    ]


class llama_perf_sampler_data(ctypes.Structure):
    _fields_ = [("t_sample_ms", ctypes.c_double), ("n_sample", ctypes.c_int32)]


class llama_sampler_chain_params(ctypes.Structure):
    _fields_ = [("no_perf", ctypes.c_bool)]


def llama_model_default_params() -> llama_model_params:
    """llama.cpp's defaults (all layers on the GPU where there is one, memory-mapped load)."""
    p = llama_model_params()
    p.n_gpu_layers, p.split_mode, p.load_mode, p.lazy_mode = -1, _c.LLAMA_SPLIT_MODE_LAYER, _c.LLAMA_LOAD_MODE_AUTO, 1
    p.use_extra_bufts = True
    return p


def llama_context_default_params() -> llama_context_params:
    """llama.cpp's defaults: n_ctx 512, n_batch 2048, n_ubatch 512, one sequence, f16 cache, 4 threads (or the
    CPUs this process may use, if fewer)."""
    p = llama_context_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.n_outputs_max_per_seq = 512, 2048, 512, 1, 1
    p.n_threads = p.n_threads_batch = min(4, usable_cpus())
    p.rope_scaling_type, p.pooling_type, p.attention_type = -1, -1, -1
    p.flash_attn_type = _c.LLAMA_FLASH_ATTN_TYPE_AUTO
    p.yarn_ext_factor = p.yarn_attn_factor = p.yarn_beta_fast = p.yarn_beta_slow = p.defrag_thold = -1.0
    p.type_k = p.type_v = _c.GGML_TYPE_F16
    p.offload_kqv = p.no_perf = p.op_offload = p.swa_full = True
    return p


def llama_sampler_chain_default_params() -> llama_sampler_chain_params:
    return llama_sampler_chain_params(no_perf=True)
