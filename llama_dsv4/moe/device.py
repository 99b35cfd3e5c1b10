"""The hot experts on a device follow the routing statistics: each MoE layer's device slots (engine/hot_experts.py)
hold the first N experts of the residency's ranking (residency.py, policy.ranking), reassigned after every update
(every 1,024 counted tokens), only the experts that changed copied again (docs/moe-residency.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .residency import ExpertResidency


class DeviceHotSets:
    """Keeps `hot` (a context's HotExperts) on the first hot.count experts of each layer's ranking in `residency`,
    now and after each of its updates."""

    def __init__(self, hot: Any, residency: ExpertResidency) -> None:
        self.hot = hot
        self.copies = 0  # expert slots copied to the device since the start (the first assignment included)
        self.updates = 0
        self.follow(residency.order)
        residency.listeners.append(self.follow)

    def follow(self, order: np.ndarray) -> None:
        """Make each layer's device set the first hot.count experts of its row of `order` (hottest first)."""
        for il in self.hot.layers:
            self.copies += self.hot.assign(il, order[il, : self.hot.count])
        self.updates += 1

    def stats(self) -> dict[str, Any]:
        """`device` (its name), `device_hot_experts` (per layer), `device_hot_bytes`, `device_slot_copies`,
        `device_updates` for Llama.moe_stats."""
        return {
            "device": self.hot.device,
            "device_hot_experts": self.hot.count,
            "device_hot_bytes": self.hot.nbytes,
            "device_slot_copies": self.copies,
            "device_updates": self.updates,
        }
