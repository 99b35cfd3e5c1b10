"""The deepseek4 model writer: random-weight GGUF files of any size, for tests, benchmarks and the demo model.

Files follow docs/architecture.md §3-4 (keys and tensors, via params.py and tensors.py) and §15 (the tiny
model's parameters are DSV4Params' defaults, the initialisation is §15.3). Each tensor's values depend only on
(seed, tensor name), so single and split files, and files of different dtypes, hold the same weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import _ggml
from ..chat.templates import default_chat_template
from .gguf_format import GGMLType
from .gguf_write import KV, TensorEntry, string, u32, write_gguf
from .params import ARCH, DSV4Params, params_to_kv
from .quant_mixes import FTYPES, WEIGHT_TYPES, Mix, needs_imatrix, parse, plan
from .tensors import Role, TensorSpec, model_tensors
from .vocab import Vocab, real_vocab, small_vocab

DType = Literal["f32", "f16", "q8xq5"]
DTYPES: tuple[str, ...] = ("f32", "f16", "q8xq5")  # ours; llama.cpp's file types and "pure:TYPE" besides
_FILE_TYPE = {"f32": 0, "f16": 1, "q8xq5": 7}  # llama.cpp's general.file_type (7: mostly Q8_0)


@dataclass(frozen=True)
class Init:
    """Scales of the random initialisation (defaults: docs/architecture.md §15.3, O(1) activations everywhere)."""

    router_scale: float = 1.0  # multiplies the router weights (0.3 with a wide bias makes top-k decisive)
    bias_std: float = 0.3  # std of exp_probs_b, the selection-only router bias
    norm_std: float = 0.1  # norm weights are 1 + N(0, norm_std)


def tensor_type(spec: TensorSpec, dtype: str) -> GGMLType:
    """The stored type of a tensor in each dtype variant."""
    if spec.role == Role.TID2EID:
        return GGMLType.I32
    if len(spec.ne) == 1 or spec.role == Role.NORM:
        return GGMLType.F32
    if dtype == "f32":
        return GGMLType.F32
    if dtype == "f16":
        return GGMLType.F16
    if dtype == "q8xq5":
        if spec.role == Role.EXPERTS:
            return GGMLType.Q5_K
        if spec.role in (Role.ATTN, Role.SHARED, Role.ROUTER, Role.OUTPUT):
            return GGMLType.Q8_0
        return GGMLType.F16  # embeddings, hyper-connection mixers, compressors, indexer, MTP projection
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")


def random_values(spec: TensorSpec, p: DSV4Params, seed: int, init: Init) -> np.ndarray:
    """The float32 (int32 for tid2eid) values of one tensor, in numpy order (reversed ne)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    shape = spec.ne[::-1]
    name = spec.name
    if spec.role == Role.TID2EID:
        k, n_vocab = spec.ne
        return np.argsort(rng.random((n_vocab, p.n_expert)), axis=1)[:, :k].astype(np.int32)

    def normal(std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    if spec.role == Role.NORM:
        if name.endswith("attn_sinks.weight"):
            return normal(1.0)
        if name.endswith("exp_probs_b.bias"):
            return normal(init.bias_std)
        if "hc_" in name and name.endswith("base.weight"):
            return normal(0.5)
        if "hc_" in name and name.endswith("scale.weight"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return (1.0 + normal(init.norm_std)).astype(np.float32)
    if spec.role == Role.EMBED:
        return normal(1.0)
    if name.endswith("_ape.weight"):
        return normal(1.0)
    std = spec.ne[0] ** -0.5  # N(0, 1/fan_in): unit-scale pre-activations
    if spec.role == Role.ROUTER:
        std *= init.router_scale
    return normal(std)


def encode(values: np.ndarray, ggml_type: int, imatrix: bool = False) -> np.ndarray:
    """Values (numpy order) as the bytes of `ggml_type`; imatrix: quantize with a uniform importance matrix (every
    column equally important: what a random-weight model's unit-scale activations give on average)."""
    if ggml_type == GGMLType.I32:
        return np.ascontiguousarray(values, dtype=np.int32)
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == GGMLType.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    rows = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    weights = np.ones(rows.shape[1], np.float32) if imatrix else None
    return _ggml.quantize(rows, int(ggml_type), weights)


def _all_dtypes() -> list[str]:
    return [*DTYPES, *FTYPES, *(f"pure:{t}" for t in WEIGHT_TYPES)]


def mix_types(p: DSV4Params, dtype: str) -> tuple[Mix, dict[str, GGMLType]]:
    """A llama.cpp file type's (or "pure:TYPE"'s) choice of type for each tensor of a model with parameters p, and
    the Mix (with has_imatrix set where the types need an importance matrix, as llama.cpp's quantizer demands)."""
    mix = parse(dtype)
    if mix is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {_all_dtypes()}")
    specs = [(s.name, s.ne) for s in model_tensors(p)]
    types = plan(mix, specs, p.block_count, p.n_expert)
    if needs_imatrix(mix, types):
        mix = Mix(mix.ftype, mix.pure, has_imatrix=True)
        types = plan(mix, specs, p.block_count, p.n_expert)
    return mix, types


def write_model(
    path: str,
    params: DSV4Params | None = None,
    *,
    dtype: str = "f32",
    seed: int = 0,
    vocab: Literal["small", "real", "none"] | Vocab = "small",
    n_shards: int = 1,
    chat_template: str | None = "default",
    init: Init | None = None,
    name: str = "llama-dsv4 random deepseek4",
    attn_output_a_3d: bool = False,
    extra_kv: list[KV] | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
) -> list[str]:
    """Write a random-weight deepseek4 GGUF and return its path(s).

    params:      hyperparameters (default: the tiny model of docs/architecture.md §15.1); n_vocab is taken from the
                 vocabulary.
    dtype:       "f32", "f16" (every >= 2-D tensor F16), "q8xq5" (Q8_0 attention, shared expert, router, output, Q5_K
                 routed experts, F16 embeddings/mixers/compressors/indexer, F32 1-D tensors; I32 tid2eid always);
                 or one of llama.cpp's file types ("Q4_K_M", "Q2_K", "IQ2_XXS", "MXFP4_MOE", ...: the types its
                 quantizer picks for each deepseek4 tensor, quant_mixes.py; router and 1-D tensors F32), or
                 "pure:TYPE" (every tensor llama.cpp quantizes in ggml type TYPE, falling back as llama.cpp does
                 where TYPE's block does not divide the row). Mixes with types that need an importance matrix
                 are quantized with a uniform one.
    vocab:       "small" (512-token BPE cut from the real one), "real" (DeepSeek V4, 129280 tokens) or "none"
                 (tokenizer.ggml.model = no_vocab).
    n_shards:    > 1 splits the file as llama.cpp's gguf-split does (`path` minus .gguf + -0000i-of-0000N.gguf).
    chat_template: "default" (ours), None (no template), or a template string.
    attn_output_a_3d: store attn_output_a as {H*d/G, Ro, G} (same bytes) as some forks do.
    weights:     given values (numpy order, the reverse of ne; float, or int32 for tid2eid) in place of random ones,
                 for every tensor of the model (a trained model's export: train/export.py).
    """
    p = params or DSV4Params()
    init = init or Init()
    voc: Vocab | None
    if isinstance(vocab, Vocab):
        voc = vocab
    elif vocab in ("small", "real", "none"):
        voc = {"small": small_vocab, "real": real_vocab, "none": lambda: None}[vocab]()
    else:
        raise ValueError(f"unknown vocab {vocab!r}; expected 'small', 'real', 'none' or a Vocab")
    if voc is not None and voc.n_tokens != p.n_vocab:
        p = p.with_(n_vocab=voc.n_tokens)
    mix: Mix | None = None
    mix_of: dict[str, GGMLType] = {}
    if dtype in DTYPES:
        file_type, quant_version = _FILE_TYPE[dtype], dtype == "q8xq5"
    else:
        mix, mix_of = mix_types(p, dtype)
        file_type, quant_version = mix.file_type, True

    kvs: list[KV] = [
        string("general.architecture", ARCH),
        string("general.name", name),
        u32("general.file_type", file_type),
        *([u32("general.quantization_version", 2)] if quant_version else []),
        *params_to_kv(p),
    ]
    kvs += voc.to_kv() if voc is not None else [string("tokenizer.ggml.model", "no_vocab")]
    template = default_chat_template() if chat_template == "default" else chat_template
    if template is not None:
        kvs.append(string("tokenizer.chat_template", template))
    kvs += extra_kv or []

    specs = {s.name: s for s in model_tensors(p)}
    if weights is not None:
        missing = sorted(set(specs) - set(weights))
        extra = sorted(set(weights) - set(specs))
        if missing or extra:
            raise ValueError(f"weights: missing {missing[:5]}, unknown {extra[:5]}")
        for name, v in weights.items():
            if int(np.prod(np.shape(v))) != int(np.prod(specs[name].ne)):
                raise ValueError(f"weights: {name} has shape {np.shape(v)}, expected ne {specs[name].ne}")
    entries = []
    for s in specs.values():
        t = tensor_type(s, dtype) if mix is None else mix_of.get(s.name, tensor_type(s, "f32"))
        ne = s.ne
        if attn_output_a_3d and s.alt_ne is not None:
            ne = s.alt_ne
        sizes = _ggml.type_traits(int(t))
        assert sizes is not None
        if ne[0] % sizes[1]:
            raise ValueError(
                f"{s.name}: {sizes[0]} needs ne0 to be a multiple of {sizes[1]}, got {ne[0]}; "
                f"pick sizes that fit or another dtype"
            )
        entries.append(TensorEntry(s.name, ne, int(t)))

    def data(e: TensorEntry) -> np.ndarray:
        spec = specs[e.name]
        v = random_values(spec, p, seed, init) if weights is None else np.reshape(weights[e.name], spec.ne[::-1])
        return encode(v, e.type, imatrix=mix is not None and mix.has_imatrix)

    return write_gguf(path, kvs, entries, data, n_shards=n_shards)
