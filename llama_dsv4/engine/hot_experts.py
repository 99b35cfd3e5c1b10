"""Hot experts on a device: each MoE layer's H hot experts copied into a device's memory, the cold ones computed by
the CPU from the mapped model file (docs/moe-residency.md, "Hot experts on a device").

Data flow: the context makes one HotExperts for its layers when asked (`Context(..., hot_experts=H)`); it binds the
tensors named by `names(il)` into each layer's HotW (engine/graph.pxd), and the graph routes every pick to both
sides with its weight on one (engine/graph.pyx, `routed_split`). `assign(il, experts)` changes a layer's hot set:
experts that stay keep their slots, only the slots that change are copied (from the expert tensors, wherever they
are), then the three lookup rows are rewritten. Which experts are hot is the caller's choice (for example the
ranking of moe/policy.py over the routing counts); nothing here depends on routing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _ggml
from ..model.gguf_format import GGMLType

KINDS = ("gate", "up", "down")  # the expert tensors copied, as ffn_{kind}_exps


def place(current: Sequence[int], wanted: Sequence[int]) -> tuple[list[int], list[int]]:
    """The slot order for a new hot set and the slots whose contents change: an expert of both sets keeps its slot,
    the others fill the freed slots in the order given. current: the expert in each slot; wanted: the new set
    (the same size)."""
    keep = set(current) & set(wanted)
    incoming = [e for e in wanted if e not in keep]
    out = list(current)
    changed = []
    for j, e in enumerate(current):
        if e not in keep:
            out[j] = incoming.pop(0)
            changed.append(j)
    return out, changed


def lookup_rows(slots: Sequence[int], n_expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three rows the graph reads, over the n_expert experts: slot (e's slot; 0 for a cold expert), cold (e for
    a cold expert, else the first cold expert; 0 when all are hot) and is_hot (1.0 or 0.0)."""
    slot = np.zeros(n_expert, np.int32)
    is_hot = np.zeros(n_expert, np.float32)
    for j, e in enumerate(slots):
        slot[e] = j
        is_hot[e] = 1.0
    cold_ids = np.flatnonzero(is_hot == 0)
    cold = np.full(n_expert, cold_ids[0] if len(cold_ids) else 0, np.int32)
    cold[cold_ids] = cold_ids
    return slot, cold, is_hot


class HotExperts:
    """The hot experts of the MoE layers `layers` (each with `count` slots) in the memory of backend `device` of
    `backends`, copied from `weights` (the model's WeightMap). Initially experts 0 ... count-1 of each layer."""

    def __init__(
        self, weights: _ggml.WeightMap, backends: _ggml.Backends, device: int, layers: Sequence[int], count: int
    ) -> None:
        self.layers = list(layers)
        self.count = count
        self.weights = weights
        specs = []
        self.n_expert = 0
        for il in self.layers:
            for kind in KINDS:
                type_id, ne, _, _ = weights.info(self.source(il, kind))
                self.n_expert = ne[2]
                specs.append((self.name(il, kind), type_id, (ne[0], ne[1], count)))
            specs += [
                (self.name(il, "slot"), int(GGMLType.I32), (1, self.n_expert)),
                (self.name(il, "cold"), int(GGMLType.I32), (1, self.n_expert)),
                (self.name(il, "is_hot"), int(GGMLType.F32), (1, self.n_expert)),
            ]
        if not 1 <= count <= self.n_expert:
            raise ValueError(f"hot experts per layer must be between 1 and the {self.n_expert} experts, got {count}")
        self.tensors = _ggml.DeviceTensors(backends, device, specs)
        self.slots: dict[int, list[int]] = {}
        for il in self.layers:
            self.slots[il] = list(range(count))
            for j in range(count):
                self._copy(il, j, j)
            self._write_rows(il)

    @staticmethod
    def name(il: int, what: str) -> str:
        """The name of a layer's hot tensor (what: gate, up, down, slot, cold, is_hot)."""
        return f"hot.{il}.{what}"

    @staticmethod
    def source(il: int, kind: str) -> str:
        return f"blk.{il}.ffn_{kind}_exps.weight"

    @property
    def nbytes(self) -> int:
        """Device memory the copies and rows take."""
        return int(self.tensors.nbytes)

    @property
    def device(self) -> str:
        return str(self.tensors.device)

    def assign(self, il: int, experts: Sequence[int]) -> int:
        """Make `experts` (count distinct ids) layer il's hot set; the slots copied (0 when the set is unchanged)."""
        if il not in self.slots:
            raise ValueError(f"layer {il} has no hot experts (layers {self.layers[0]}...{self.layers[-1]} have)")
        wanted = [int(e) for e in experts]
        if len(wanted) != self.count or len(set(wanted)) != self.count:
            raise ValueError(f"layer {il}: give {self.count} distinct experts, got {list(experts)}")
        if any(not 0 <= e < self.n_expert for e in wanted):
            raise ValueError(f"layer {il}: expert ids must be in [0, {self.n_expert}), got {wanted}")
        slots, changed = place(self.slots[il], wanted)
        for j in changed:
            self._copy(il, slots[j], j)
        self.slots[il] = slots
        if changed:
            self._write_rows(il)
        return len(changed)

    def hot(self, il: int) -> list[int]:
        """Layer il's hot experts, in slot order."""
        return list(self.slots[il])

    def _copy(self, il: int, expert: int, slot: int) -> None:
        for kind in KINDS:
            src = self.source(il, kind)
            _, ne, nbytes, _ = self.weights.info(src)
            per = nbytes // ne[2]
            self.tensors.write(self.name(il, kind), slot * per, self.weights.read(src, expert * per, per))

    def _write_rows(self, il: int) -> None:
        for what, row in zip(("slot", "cold", "is_hot"), lookup_rows(self.slots[il], self.n_expert), strict=True):
            self.tensors.write(self.name(il, what), 0, row)

    def close(self) -> None:
        self.tensors.close()
