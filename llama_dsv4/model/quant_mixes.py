"""llama.cpp's quantization mixes for deepseek4 tensors: which ggml type each tensor gets in a file named by one
of llama.cpp's file types ("Q4_K_M", "IQ2_XXS", "MXFP4_MOE", ...), and where it needs an importance matrix.

The rules are those llama.cpp's quantizer (src/llama-quant.cpp, llama-cpp-python 0.3.36) applies to the tensors
of a deepseek4 model, restated as tables: most of its per-category rules name tensor kinds deepseek4 does not
have (attn_v, attn_k, attn_q, attn_output, attn_qkv): its attention projections (attn_q_a, attn_q_b, attn_kv,
attn_output_a/b), hyper-connection mixers, compressors, indexer and MTP projection fall in its "other" category
and take the file's default type. What remains: the output head, the token embedding, the FFN tensors (routed
experts and shared expert alike: the rules match "ffn_down", "ffn_gate", "ffn_up" in the name) by layer, and
MXFP4_MOE's split between 3-D (expert) and other tensors. A tensor whose row length the chosen type's block does
not divide falls back as llama.cpp's does (256-blocks to a 32-block type, then F16).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _ggml
from .gguf_format import GGMLType as T

# the weight types a llama.cpp deepseek4 quantization can contain (names as ggml spells them)
WEIGHT_TYPES: dict[str, T] = {
    t.name: t
    for t in (
        *(T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0),
        *(T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS),
        *(T.MXFP4, T.BF16, T.F16, T.F32),
    )
}

# llama.cpp's file types: name -> (general.file_type, default tensor type)
FTYPES: dict[str, tuple[int, T]] = {
    "F32": (0, T.F32),
    "F16": (1, T.F16),
    "Q4_0": (2, T.Q4_0),
    "Q4_1": (3, T.Q4_1),
    "Q8_0": (7, T.Q8_0),
    "Q5_0": (8, T.Q5_0),
    "Q5_1": (9, T.Q5_1),
    "Q2_K": (10, T.Q2_K),
    "Q3_K_S": (11, T.Q3_K),
    "Q3_K_M": (12, T.Q3_K),
    "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K),
    "Q4_K_M": (15, T.Q4_K),
    "Q5_K_S": (16, T.Q5_K),
    "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K),
    "IQ2_XXS": (19, T.IQ2_XXS),
    "IQ2_XS": (20, T.IQ2_XS),
    "Q2_K_S": (21, T.Q2_K),
    "IQ3_XS": (22, T.IQ3_S),
    "IQ3_XXS": (23, T.IQ3_XXS),
    "IQ1_S": (24, T.IQ1_S),
    "IQ4_NL": (25, T.IQ4_NL),
    "IQ3_S": (26, T.IQ3_S),
    "IQ3_M": (27, T.IQ3_S),
    "IQ2_S": (28, T.IQ2_XS),
    "IQ2_M": (29, T.IQ2_S),
    "IQ4_XS": (30, T.IQ4_XS),
    "IQ1_M": (31, T.IQ1_M),
    "BF16": (32, T.BF16),
    "MXFP4_MOE": (38, T.MXFP4),
}
# a type's own file type, for files with every quantizable tensor in one type ("pure:Q4_K"; llama-quantize --pure)
PURE_FTYPE: dict[T, str] = {T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.IQ2_S: "IQ2_M"}
PURE_FTYPE[T.MXFP4] = "MXFP4_MOE"

_IQ1_IQ2 = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"})
# output head: these file types give it Q5_K (others Q6_K, or Q8_0 when the file is Q8_0 or MXFP4_MOE)
_OUTPUT_Q5_K = _IQ1_IQ2 | {"IQ3_XXS"}
_EMBD = {"IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K, "IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K, "IQ2_S": T.IQ3_S}
_EMBD |= {"IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S}
# 256-block types whose row length does not fit fall back to these 32-block types (then F16 if that does not fit)
FALLBACK: dict[T, T] = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}
# types whose quantization needs an importance matrix: ggml refuses these without one ...
GGML_NEEDS_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})
# ... and llama.cpp refuses these (except in token_embd and output), Q2_K too in a Q2_K_S file
LLAMA_NEEDS_IMATRIX = GGML_NEEDS_IMATRIX | {T.IQ3_XXS, T.IQ2_S, T.IQ1_M}


def _block(t: T) -> int:
    traits = _ggml.type_traits(int(t))
    assert traits is not None
    return int(traits[1])


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in *_M mixes: the first and last eighth, and every third
    layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _ffn_down(ftype: str, t: T, i: int, n: int, has_imatrix: bool, n_expert: int) -> T:
    """The FFN down projection of layer i of n (n counts the MTP layers, as llama.cpp's block_count does)."""
    rules: dict[str, T | None] = {
        "Q2_K": T.Q3_K,
        "Q2_K_S": T.Q4_K if i < n // 8 else None,
        "IQ3_XXS": None if has_imatrix else (T.Q4_K if i < n // 8 else T.Q3_K),
        "Q3_K_M": T.Q5_K if i < n // 16 else T.Q4_K,
        "IQ3_M": T.Q4_K if i < n // 8 or (n_expert == 8 and use_more_bits(i, n)) else None,
        "Q3_K_L": T.Q5_K,
        "Q4_K_M": T.Q6_K if use_more_bits(i, n) else None,
        "IQ4_NL": T.Q5_K if i < n // 8 and not has_imatrix else None,
        "IQ4_XS": T.Q5_K if i < n // 8 and not has_imatrix else None,
        "Q5_K_M": T.Q6_K if use_more_bits(i, n) else None,
        "Q4_K_S": T.Q5_K if i < n // 8 else None,
        "Q4_0": T.Q4_1 if has_imatrix and i < n // 8 else None,
        "Q5_0": T.Q5_1 if has_imatrix and i < n // 8 else None,
    }
    return rules.get(ftype) or t


@dataclass(frozen=True)
class Mix:
    """A file type's choices for one model: `ftype` is llama.cpp's name, `pure` keeps every quantizable tensor in
    the default type (llama-quantize --pure), `has_imatrix` says whether the file is quantized with an importance
    matrix (which changes a few choices)."""

    ftype: str
    pure: bool = False
    has_imatrix: bool = False

    @property
    def file_type(self) -> int:
        return FTYPES[self.ftype][0]

    @property
    def default(self) -> T:
        return FTYPES[self.ftype][1]


def parse(dtype: str) -> Mix | None:
    """The Mix a writer dtype names ("Q4_K_M", "pure:Q4_K", ...), or None if it names none."""
    if dtype in FTYPES:
        return Mix(dtype)
    if dtype.startswith("pure:") and dtype[5:] in WEIGHT_TYPES:
        t = WEIGHT_TYPES[dtype[5:]]
        name = PURE_FTYPE.get(t, t.name)
        return Mix(name, pure=True) if FTYPES[name][1] == t else None
    return None


def quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer changes this tensor's type at all (2-D and 3-D weights except norms, the router
    and the hash routing table)."""
    return (
        len(ne) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "ffn_gate_tid2eid.weight" not in name
    )


def fallback(t: T, ne0: int) -> T:
    """The type llama.cpp stores a tensor of row length ne0 in when it chose `t`."""
    if ne0 % _block(t) == 0:
        return t
    f = FALLBACK.get(t, t)
    return f if ne0 % _block(f) == 0 else T.F16


def plan(mix: Mix, tensors: list[tuple[str, tuple[int, ...]]], n_layer_all: int, n_expert: int) -> dict[str, T]:
    """The type of each quantizable tensor (name, ne) of a model in `mix`; the others keep their source type."""
    out: dict[str, T] = {}
    d, f = mix.default, mix.ftype
    quantized = d not in (T.F32, T.F16, T.BF16)
    n_down = 0  # llama.cpp counts FFN down tensors in name order for the IQ1/IQ2 mixes' first-eighth rule
    for name, ne in sorted(t for t in tensors if quantizable(*t)):
        t = d
        if quantized and not mix.pure:
            t = _choose(mix, name, ne, n_layer_all, n_expert, n_down)
            n_down += "ffn_down" in name and f in _IQ1_IQ2
        out[name] = fallback(t, ne[0]) if quantized else t
    return out


def _choose(mix: Mix, name: str, ne: tuple[int, ...], n_layer_all: int, n_expert: int, n_down: int) -> T:
    d, f = mix.default, mix.ftype
    if name == "output.weight":
        if f == "MXFP4_MOE" or ne[0] % _block(d):
            return T.Q8_0
        return T.Q5_K if f in _OUTPUT_Q5_K else d if d == T.Q8_0 else T.Q6_K
    if f == "MXFP4_MOE":
        return T.MXFP4 if len(ne) > 2 and ne[2] > 1 else T.Q8_0
    if name == "token_embd.weight":
        return _EMBD.get(f, d)
    if f in _IQ1_IQ2:
        if "ffn_down" in name and n_down < n_layer_all // 8:
            return T.IQ3_S if f in ("IQ2_S", "IQ2_M") else T.Q2_K
        return d
    if not name.startswith("blk.") or not any(k in name for k in ("ffn_up", "ffn_gate", "ffn_down")):
        return d
    i = int(name.split(".")[1])
    if "ffn_down" in name:
        return _ffn_down(f, d, i, n_layer_all, mix.has_imatrix, n_expert)
    if f == "IQ3_XS" and n_layer_all // 8 <= i < 7 * n_layer_all // 8:
        return T.IQ3_XXS
    return d


def needs_imatrix(mix: Mix, types: dict[str, T]) -> bool:
    """Whether llama.cpp (or ggml) would refuse to write these tensor types without an importance matrix."""
    for name, t in types.items():
        if t in GGML_NEEDS_IMATRIX:
            return True
        if name not in ("token_embd.weight", "output.weight") and (
            t in LLAMA_NEEDS_IMATRIX or (t == T.Q2_K and mix.ftype == "Q2_K_S")
        ):
            return True
    return False
