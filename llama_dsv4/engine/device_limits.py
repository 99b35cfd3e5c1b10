"""What a model needs from a device that ggml's scheduler does not check: limits of a backend's kernels that abort
at run time instead of sending the node to the CPU. Checked when a context is made (engine/context.pyx), so that
a model the device cannot run is a ValueError naming why, not an abort in the middle of a prompt.

Metal (ggml 0.20.2, the macOS arm64 wheel of libggml-python): MUL_MAT_ID on 32 rows or more (prompt processing)
needs an id-map kernel that exists only for these experts-per-token counts (ggml-metal.metal, the
kernel_mul_mm_id_map0 instances), while its supports_op accepts every count. docs/metal.md has the study.
"""

from __future__ import annotations

from collections.abc import Iterable

METAL_EXPERTS_PER_TOKEN = frozenset({1, 2, 4, 5, 6, 8, 10, 16, 22})


def is_metal(device_name: str) -> bool:
    """Whether a ggml device name is a Metal device ("MTL0", "MTL1", ...)."""
    return device_name.upper().startswith("MTL")


def check_device_limits(device_names: Iterable[str], n_expert_used: int) -> None:
    """ValueError when one of the devices (ggml device names, as Backends.device_info() gives them) cannot run a
    model that routes each token to n_expert_used experts."""
    for name in device_names:
        if is_metal(name) and n_expert_used not in METAL_EXPERTS_PER_TOKEN:
            raise ValueError(
                f"device {name}: ggml 0.20.2's Metal backend has no expert-product kernel for {n_expert_used} "
                f"experts per token (it has {sorted(METAL_EXPERTS_PER_TOKEN)}) and would abort in prompt "
                "processing; run this model with device='cpu'"
            )
