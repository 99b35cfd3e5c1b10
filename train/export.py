"""Write a trained (or freshly initialised) network as a deepseek4 GGUF with our writer: the same tensors and keys as
any deepseek4 file, in each of the writer's dtypes."""

from __future__ import annotations

from llama_dsv4.model.vocab import Vocab
from llama_dsv4.model.writer import write_model

from .model import DSV4


def export(net: DSV4, path: str, *, dtype: str = "f32", vocab: Vocab | str = "none", name: str | None = None) -> str:
    """Write `net` to `path` (dtype "f32", "f16" or "q8xq5") and return the path."""
    return write_model(
        path,
        net.p,
        dtype=dtype,
        vocab=vocab,  # type: ignore[arg-type]
        weights=net.tensors(),
        name=name or "llama-dsv4 trained deepseek4",
    )[0]
