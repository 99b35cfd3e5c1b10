"""The per-sequence state of a deepseek4 context: every tensor, its type and shape (docs/architecture.md §11).

The context allocates exactly this list, so the figures below are what a context really takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.params import DSV4Params, LayerKind

CACHE_BYTES = {"f32": 4, "f16": 2}


@dataclass(frozen=True)
class StateTensor:
    layer: int
    name: str  # the LayerState field the context binds it to: raw, comp, lid, c.kv, c.sc, ic.kv, ic.sc
    dtype: str  # "f32" or "f16"
    ne: tuple[int, int]  # ggml order: (row width, rows)

    @property
    def nbytes(self) -> int:
        return self.ne[0] * self.ne[1] * CACHE_BYTES[self.dtype]


def window(p: DSV4Params, n_ctx: int) -> int:
    """The sliding window in effect: a token sees at most the n_ctx - 1 positions before it, so a window beyond
    n_ctx means the same as n_ctx."""
    return min(p.sliding_window, n_ctx)


def ring_rows(p: DSV4Params, n_ctx: int, n_ubatch: int) -> int:
    """Rows of the sliding-window ring: the window of a ubatch's last token plus the rest of the ubatch, and never
    more than n_ctx (a ring of n_ctx rows never wraps: every position has its own slot)."""
    return min(window(p, n_ctx) - 1 + min(n_ubatch, n_ctx), n_ctx)


def backup_rows(kind: int, keep_back: int) -> int:
    """Compressor rows kept aside so that a truncation by up to keep_back positions needs no evaluation again: the
    blocks those positions may reach back into (docs/speculative.md)."""
    return kind * -(-keep_back // kind) if keep_back > 0 else 0


def state_tensors(
    p: DSV4Params, n_ctx: int, n_ubatch: int, type_k: str, mtp: bool = False, keep_back: int = 0
) -> list[StateTensor]:
    """Every tensor of one sequence's state (with mtp: also the MTP block's, layer n_layer: its sliding-window ring
    only; with keep_back: the compressors' backup rows; docs/speculative.md)."""
    if type_k not in CACHE_BYTES:
        raise ValueError(f"type_k must be one of {sorted(CACHE_BYTES)}, got {type_k!r}")
    d, di = p.head_dim, p.indexer_head_dim
    out = []
    for il in range(p.n_layer):
        kind = p.kind(il)
        out.append(StateTensor(il, "raw", type_k, (d, ring_rows(p, n_ctx, n_ubatch))))
        if kind != LayerKind.SWA:
            coff = 2 if kind == LayerKind.CSA else 1  # CSA pools overlapping blocks: two halves of each row
            out.append(StateTensor(il, "comp", type_k, (d, -(-n_ctx // kind))))
            rows = coff * kind + backup_rows(kind, keep_back)
            out.append(StateTensor(il, "c.kv", "f32", (coff * d, rows)))
            out.append(StateTensor(il, "c.sc", "f32", (coff * d, rows)))
        if kind == LayerKind.CSA:
            out.append(StateTensor(il, "lid", type_k, (di, -(-n_ctx // kind))))
            out.append(StateTensor(il, "ic.kv", "f32", (2 * di, 2 * kind + backup_rows(kind, keep_back))))
            out.append(StateTensor(il, "ic.sc", "f32", (2 * di, 2 * kind + backup_rows(kind, keep_back))))
    if mtp:
        out.append(StateTensor(p.n_layer, "raw", type_k, (d, ring_rows(p, n_ctx, n_ubatch))))
    return out


def state_bytes(
    p: DSV4Params,
    n_ctx: int,
    n_ubatch: int = 512,
    type_k: str = "f16",
    n_seq: int = 1,
    mtp: bool = False,
    keep_back: int = 0,
) -> int:
    """Bytes of the state of n_seq sequences at this context length (before the allocator's alignment padding):
    a context holding several sequences allocates state_tensors once per sequence."""
    return n_seq * sum(t.nbytes for t in state_tensors(p, n_ctx, n_ubatch, type_k, mtp, keep_back))


def bytes_per_token(p: DSV4Params, type_k: str = "f16") -> float:
    """The state bytes that grow with the context, per token: the compressed caches (CSA, indexer, HCA)."""
    n = 1 << 20
    grow = [t for t in state_tensors(p, n, 1, type_k) if t.name in ("comp", "lid")]
    return sum(t.nbytes for t in grow) / n
