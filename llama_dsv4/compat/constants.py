"""Constants and helpers of llama-cpp-python's low-level `llama_cpp.llama_cpp` that user code passes to `Llama`
(same names and values). The ctypes API itself is not provided."""

from __future__ import annotations

from .. import _ggml

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_MAX_DEVICES = 16
LLAMA_SPLIT_MODE_NONE, LLAMA_SPLIT_MODE_LAYER, LLAMA_SPLIT_MODE_ROW, LLAMA_SPLIT_MODE_TENSOR = 0, 1, 2, 3
LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
LLAMA_ROPE_SCALING_TYPE_NONE, LLAMA_ROPE_SCALING_TYPE_LINEAR, LLAMA_ROPE_SCALING_TYPE_YARN = 0, 1, 2
LLAMA_ROPE_SCALING_TYPE_LONGROPE = 3
LLAMA_ROPE_SCALING_TYPE_MAX_VALUE = LLAMA_ROPE_SCALING_TYPE_LONGROPE
LLAMA_POOLING_TYPE_UNSPECIFIED, LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN = -1, 0, 1
LLAMA_POOLING_TYPE_CLS, LLAMA_POOLING_TYPE_LAST, LLAMA_POOLING_TYPE_RANK = 2, 3, 4
LLAMA_ATTENTION_TYPE_UNSPECIFIED, LLAMA_ATTENTION_TYPE_CAUSAL, LLAMA_ATTENTION_TYPE_NON_CAUSAL = -1, 0, 1
LLAMA_FLASH_ATTN_TYPE_AUTO, LLAMA_FLASH_ATTN_TYPE_DISABLED, LLAMA_FLASH_ATTN_TYPE_ENABLED = -1, 0, 1
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1 = 0, 1, 2, 3
GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_Q8_1 = 6, 7, 8, 9
GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_K = 10, 11, 12, 13, 14, 15
GGML_TYPE_BF16 = 30
LLAMA_TOKEN_NULL = -1


def llama_supports_mmap() -> bool:
    return True


def llama_supports_mlock() -> bool:
    return True


def llama_supports_gpu_offload() -> bool:
    return any(d["type"] in ("gpu", "igpu") for d in _ggml.devices())


def llama_max_devices() -> int:
    return LLAMA_MAX_DEVICES


def llama_print_system_info() -> bytes:
    return (" | ".join(f"{d['name']} ({d['type']}): {d['description']}" for d in _ggml.devices())).encode()


def llama_log_set(log_callback: object, user_data: object) -> None:
    """Accepted for compatibility; llama-dsv4 logs through Python's logging."""


def llama_backend_init() -> None:
    """Nothing to do: the backends start with the first model."""
