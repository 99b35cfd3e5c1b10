"""Every deepseek4 hyperparameter, parsed once from GGUF metadata into one frozen, validated object.

The key table below is the single place that knows GGUF key names and types: the loader parses with it and the
writer emits with it (docs/architecture.md §3). Defaults are the tiny test model (§15.1 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import Any

import numpy as np

from .gguf_format import INTEGER_TYPES, ValueType
from .gguf_write import KV, array, boolean, f32, string, u32

ARCH = "deepseek4"
GATING_SQRT_SOFTPLUS = 4
ROPE_SCALING_TYPES = ("none", "linear", "yarn")


class LayerKind(IntEnum):
    """A layer's attention, named by the compression ratio the file gives it (docs/architecture.md). Every layer
    attends over its sliding window; the compressed kinds also attend over pooled entries of the whole context.
    (engine/graph.pxd names the same values for the C side; tests/test_model_files.py checks they agree.)"""

    SWA = 0  # the sliding window only
    CSA = 4  # compressed sparse: an entry per 4 positions (overlapping blocks); the lightning indexer picks top-k
    HCA = 128  # heavily compressed: an entry per 128 positions, every visible entry attended


COMPRESS_RATIOS = tuple(int(k) for k in LayerKind)


def _f32(v: float) -> float:
    return float(np.float32(v))


@dataclass(frozen=True)
class DSV4Params:
    """The hyperparameters of a deepseek4 model, frozen and validated when made (ValueError naming the GGUF key
    of a value the engine cannot use). The defaults are the tiny test model (docs/architecture.md §15.1); give
    other values to write another model, e.g. `write_model(path, DSV4Params(n_embd=1024, n_expert=64))`.
    Floats are held as their float32 value (what the file stores); one swiglu clamp is repeated for every block.
    """

    # sizes
    n_vocab: int = 512
    n_ctx_train: int = 4096
    n_embd: int = 256
    n_layer: int = 6  # main layers; block_count = n_layer + n_nextn
    n_nextn: int = 0  # MTP layers present in the file (loaded, not run)
    n_head: int = 4
    head_dim: int = 128  # key_length == value_length; one shared K=V latent (head_count_kv = 1)
    q_lora_rank: int = 64
    o_group_count: int = 2
    o_lora_rank: int = 32
    sliding_window: int = 16
    # rope
    rope_dim: int = 32  # rotated dims: the LAST rope_dim of each head
    rope_freq_base: float = 10000.0  # ratio-0 layers
    compress_rope_freq_base: float = 160000.0  # compressed (ratio != 0) layers
    rope_scaling_type: str = "yarn"
    rope_scaling_factor: float = 16.0
    rope_orig_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    norm_eps: float = 1e-6
    # compressed attention and the lightning indexer
    compress_ratios: tuple[int, ...] = (0, 4, 128, 4, 128, 0)
    indexer_n_head: int = 2
    indexer_head_dim: int = 64
    indexer_top_k: int = 4
    # mixture of experts
    n_expert: int = 8
    n_expert_used: int = 2
    expert_ff: int = 256
    n_expert_shared: int = 1
    expert_weights_scale: float = 1.5
    expert_weights_norm: bool = True
    expert_gating_func: int = GATING_SQRT_SOFTPLUS
    hash_layer_count: int = 2
    swiglu_clamp_exp: tuple[float, ...] = (1.0,)  # one value, or one per block
    swiglu_clamp_shexp: tuple[float, ...] | None = (1.5,)  # None: absent, falls back to swiglu_clamp_exp
    # hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # the value written as nextn_predict_layers; None = n_nextn. Upstream converters write 1 with no MTP
    # tensors, which readers must treat as n_nextn = 0.
    declared_nextn: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # GGUF stores these as f32 and ggml computes with f32: hold exactly the f32 value, so a parameter set
        # equals itself after a round trip through a file
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                object.__setattr__(self, f.name, _f32(v))
        for name in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
            v = getattr(self, name)
            if v is None:
                continue
            v = (_f32(v),) if np.isscalar(v) else tuple(_f32(x) for x in v)
            if len(v) == 1:
                v = v * self.block_count
            object.__setattr__(self, name, v)
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ---- derived
    @property
    def block_count(self) -> int:
        """The blocks in the file: the main layers and the MTP layers."""
        return self.n_layer + self.n_nextn

    @property
    def hc_mix(self) -> int:
        """The width of the hyper-connection mixing projection: (2 + hc_mult) * hc_mult."""
        return (2 + self.hc_mult) * self.hc_mult

    def ratio(self, il: int) -> int:
        """Layer il's compression ratio (0: sliding window only)."""
        return self.compress_ratios[il]

    def kind(self, il: int) -> LayerKind:
        """Layer il's attention kind."""
        return LayerKind(self.compress_ratios[il])

    def rope(self, il: int) -> tuple[int, float, float, float, float, float, float]:
        """Layer il's rotary parameters as ggml's rope takes them: (n_ctx_orig, freq_base, freq_scale, ext_factor,
        attn_factor, beta_fast, beta_slow). Sliding-window layers: plain RoPE at rope_freq_base; compressed layers:
        compress_rope_freq_base with the file's scaling (YaRN with its attention factor, or linear)."""
        if self.kind(il) == LayerKind.SWA:
            return 0, self.rope_freq_base, 1.0, 0.0, 1.0, 0.0, 0.0
        fs = 1.0 / self.rope_scaling_factor
        yarn = self.rope_scaling_type == "yarn"
        attn_factor = 1.0 / (1.0 + 0.1 * math.log(1.0 / fs)) if yarn else 1.0
        return (
            self.rope_orig_ctx,
            self.compress_rope_freq_base,
            fs,
            1.0 if yarn else 0.0,
            attn_factor,
            self.yarn_beta_fast,
            self.yarn_beta_slow,
        )

    def is_hash_layer(self, il: int) -> bool:
        """Whether layer il routes by token id (the tid2eid table) instead of by its router."""
        return il < self.hash_layer_count

    def clamp_exp(self, il: int) -> float:
        """Layer il's SwiGLU clamp for the routed experts."""
        return self.swiglu_clamp_exp[il]

    def clamp_shexp(self, il: int) -> float:
        """Layer il's SwiGLU clamp for the shared expert (the routed experts' where the file has none)."""
        return (self.swiglu_clamp_shexp or self.swiglu_clamp_exp)[il]

    def with_(self, **kw: Any) -> DSV4Params:
        """A copy with the given fields changed (validated again)."""
        return replace(self, **kw)

    # ---- checks (what the graph needs; ValueError names the offending key)
    def validate(self, where: str = "") -> None:
        """ValueError naming the GGUF key (prefixed by `where`) of the first value the engine cannot use."""
        pre = f"{where}: " if where else ""

        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"{pre}{ARCH}.{key}: {msg}")

        positive = {
            "context_length": self.n_ctx_train,
            "embedding_length": self.n_embd,
            "block_count": self.n_layer,
            "attention.head_count": self.n_head,
            "attention.key_length": self.head_dim,
            "attention.q_lora_rank": self.q_lora_rank,
            "attention.output_group_count": self.o_group_count,
            "attention.output_lora_rank": self.o_lora_rank,
            "attention.sliding_window": self.sliding_window,
            "attention.indexer.head_count": self.indexer_n_head,
            "attention.indexer.key_length": self.indexer_head_dim,
            "attention.indexer.top_k": self.indexer_top_k,
            "expert_count": self.n_expert,
            "expert_used_count": self.n_expert_used,
            "expert_feed_forward_length": self.expert_ff,
            "expert_shared_count": self.n_expert_shared,
            "hyper_connection.sinkhorn_iterations": self.hc_sinkhorn_iters,
            "rope.dimension_count": self.rope_dim,
            "vocab_size": self.n_vocab,
        }
        for key, v in positive.items():
            if v <= 0:
                raise bad(key, f"must be positive, got {v}")
        # sizes beyond these are not a model this engine (or this machine) can hold: refuse them early
        if self.n_embd > 1 << 16 or self.head_dim > 1 << 14 or self.n_head > 1 << 12 or self.n_vocab > 1 << 24:
            raise bad("embedding_length", "dimensions are implausibly large")
        if self.n_expert > 1 << 14 or self.block_count > 1 << 12 or self.expert_ff > 1 << 18:
            raise bad("expert_count", "expert or layer counts are implausibly large")
        # values that shape no tensor (so the file's size does not bound them) but size the state, the graph or
        # the work per token, and go into C ints: bounded here, far above any real model (V4: 1M context,
        # window 128, top-k 512, 20 Sinkhorn iterations)
        for key, v, limit in (
            ("context_length", self.n_ctx_train, 1 << 24),
            ("rope.scaling.original_context_length", self.rope_orig_ctx, 1 << 24),
            ("attention.sliding_window", self.sliding_window, 1 << 20),
            ("attention.indexer.top_k", self.indexer_top_k, 1 << 20),
            ("hyper_connection.sinkhorn_iterations", self.hc_sinkhorn_iters, 1 << 10),
            ("attention.q_lora_rank", self.q_lora_rank, 1 << 16),
            ("attention.output_lora_rank", self.o_lora_rank, 1 << 16),
            ("attention.indexer.head_count", self.indexer_n_head, 1 << 12),
            ("attention.indexer.key_length", self.indexer_head_dim, 1 << 14),
            ("expert_shared_count", self.n_expert_shared, 1 << 8),
        ):
            if v > limit:
                raise bad(key, f"{v} is implausibly large (this engine accepts at most {limit})")
        if self.n_nextn < 0:
            raise bad("nextn_predict_layers", f"must be >= 0, got {self.n_nextn}")
        if self.n_expert_used > self.n_expert:
            raise bad("expert_used_count", f"{self.n_expert_used} exceeds expert_count {self.n_expert}")
        if self.hc_mult != 4:
            raise bad("hyper_connection.count", f"must be 4, got {self.hc_mult}")
        if self.n_head % self.o_group_count:
            raise bad("attention.output_group_count", f"{self.o_group_count} does not divide {self.n_head} heads")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim or self.rope_dim > self.indexer_head_dim:
            raise bad(
                "rope.dimension_count",
                f"{self.rope_dim} must be even and <= key_length ({self.head_dim}) "
                f"and <= indexer.key_length ({self.indexer_head_dim})",
            )
        if self.expert_gating_func != GATING_SQRT_SOFTPLUS:
            raise bad(
                "expert_gating_func", f"must be {GATING_SQRT_SOFTPLUS} (sqrt-softplus), got {self.expert_gating_func}"
            )
        if not 0 <= self.hash_layer_count <= self.n_layer:
            raise bad("hash_layer_count", f"{self.hash_layer_count} is not in [0, {self.n_layer}]")
        if len(self.compress_ratios) < self.block_count:
            raise bad(
                "attention.compress_ratios",
                f"has {len(self.compress_ratios)} entries, block_count is {self.block_count}",
            )
        for il, r in enumerate(self.compress_ratios[: self.block_count]):
            if r not in COMPRESS_RATIOS:
                raise bad("attention.compress_ratios", f"layer {il} has ratio {r}; only {COMPRESS_RATIOS} exist")
        # what the architecture can mean: a token sees at most the context before it, and the indexer picks among
        # the context's blocks of 4 (the engine also bounds both by the n_ctx it runs with)
        if self.sliding_window > self.n_ctx_train:
            raise bad(
                "attention.sliding_window",
                f"{self.sliding_window} exceeds context_length {self.n_ctx_train}: no token has that many before it",
            )
        n_blocks = max(self.n_ctx_train // 4, 1)
        if LayerKind.CSA in self.compress_ratios[: self.n_layer] and self.indexer_top_k > n_blocks:
            raise bad(
                "attention.indexer.top_k",
                f"{self.indexer_top_k} exceeds the {n_blocks} blocks of 4 positions in context_length "
                f"{self.n_ctx_train}",
            )
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise bad("rope.scaling.type", f"{self.rope_scaling_type!r} is not one of {ROPE_SCALING_TYPES}")
        for key, v in {
            "rope.freq_base": self.rope_freq_base,
            "attention.compress_rope_freq_base": self.compress_rope_freq_base,
            "rope.scaling.factor": self.rope_scaling_factor,
        }.items():
            if not (math.isfinite(v) and v > 0):
                raise bad(key, f"must be a positive number, got {v}")
        for key, v in {
            "attention.layer_norm_rms_epsilon": self.norm_eps,
            "hyper_connection.epsilon": self.hc_eps,
            "expert_weights_scale": self.expert_weights_scale,
            "rope.scaling.yarn_beta_fast": self.yarn_beta_fast,
            "rope.scaling.yarn_beta_slow": self.yarn_beta_slow,
        }.items():
            if not (math.isfinite(v) and v >= 0):
                raise bad(key, f"must be a finite number >= 0, got {v}")
        if self.rope_orig_ctx < 0:
            raise bad("rope.scaling.original_context_length", f"must be >= 0, got {self.rope_orig_ctx}")
        for key, v in (("swiglu_clamp_exp", self.swiglu_clamp_exp), ("swiglu_clamp_shexp", self.swiglu_clamp_shexp)):
            if v is None:
                continue
            if len(v) != self.block_count:
                raise bad(key, f"has {len(v)} values, expected 1 or block_count = {self.block_count}")
            if not all(math.isfinite(x) for x in v):
                raise bad(key, "holds a non-finite value")


# ------------------------------------------------------------------------------------------------ GGUF keys

# (field, key suffix, kind, required). Kinds: u32, f32, bool, str, u32|arr (a u32 or an array of equal u32s),
# f32|arr (a f32 or an array of f32, one per block), i32arr (array of integers).
KEYS: tuple[tuple[str, str, str, bool], ...] = (
    ("n_ctx_train", "context_length", "u32", True),
    ("n_embd", "embedding_length", "u32", True),
    ("block_count", "block_count", "u32", True),
    ("declared_nextn", "nextn_predict_layers", "u32", False),
    ("n_head", "attention.head_count", "u32|arr", True),
    ("n_head_kv", "attention.head_count_kv", "u32|arr", True),
    ("head_dim", "attention.key_length", "u32", True),
    ("value_dim", "attention.value_length", "u32", True),
    ("rope_dim", "rope.dimension_count", "u32", True),
    ("rope_freq_base", "rope.freq_base", "f32", False),
    ("rope_scaling_type", "rope.scaling.type", "str", False),
    ("rope_scaling_factor", "rope.scaling.factor", "f32", False),
    ("rope_orig_ctx", "rope.scaling.original_context_length", "u32", False),
    ("yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f32", False),
    ("yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f32", False),
    ("norm_eps", "attention.layer_norm_rms_epsilon", "f32", True),
    ("q_lora_rank", "attention.q_lora_rank", "u32", True),
    ("sliding_window", "attention.sliding_window", "u32", True),
    ("o_group_count", "attention.output_group_count", "u32", True),
    ("o_lora_rank", "attention.output_lora_rank", "u32", True),
    ("compress_rope_freq_base", "attention.compress_rope_freq_base", "f32", True),
    ("compress_ratios", "attention.compress_ratios", "i32arr", True),
    ("indexer_n_head", "attention.indexer.head_count", "u32", True),
    ("indexer_head_dim", "attention.indexer.key_length", "u32", True),
    ("indexer_top_k", "attention.indexer.top_k", "u32", True),
    ("n_expert", "expert_count", "u32", True),
    ("n_expert_used", "expert_used_count", "u32", True),
    ("expert_ff", "expert_feed_forward_length", "u32", True),
    ("n_expert_shared", "expert_shared_count", "u32", True),
    ("expert_weights_scale", "expert_weights_scale", "f32", True),
    ("expert_weights_norm", "expert_weights_norm", "bool", True),
    ("expert_gating_func", "expert_gating_func", "u32", True),
    ("hash_layer_count", "hash_layer_count", "u32", True),
    ("swiglu_clamp_exp", "swiglu_clamp_exp", "f32|arr", True),
    ("swiglu_clamp_shexp", "swiglu_clamp_shexp", "f32|arr", False),
    ("hc_mult", "hyper_connection.count", "u32", True),
    ("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", "u32", True),
    ("hc_eps", "hyper_connection.epsilon", "f32", True),
    ("n_vocab", "vocab_size", "u32", False),
    ("expert_group_count", "expert_group_count", "u32", False),
    ("expert_group_used_count", "expert_group_used_count", "u32", False),
)


def params_from_kv(
    kv: dict[str, Any],
    kv_types: dict[str, Any],
    where: str,
    *,
    n_vocab: int | None,
    has_nextn_tensors: Any,
) -> DSV4Params:
    """Parse and validate the deepseek4 keys of a GGUF header.

    n_vocab: the tokenizer's token count (None for files without a vocabulary: `vocab_size` is then required).
    has_nextn_tensors(il): whether `blk.{il}.nextn.eh_proj.weight` exists (how llama.cpp detects MTP layers).
    """

    def bad(key: str, msg: str) -> ValueError:
        return ValueError(f"{where}: key {key!r}: {msg}")

    arch = kv.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"{where}: general.architecture is {arch!r}, expected {ARCH!r}")

    raw: dict[str, Any] = {}
    for fld, suffix, kind, required in KEYS:
        key = f"{ARCH}.{suffix}"
        if key not in kv:
            if required:
                raise bad(key, "required key is missing")
            continue
        t, v = kv_types[key], kv[key]
        if kind == "u32" or (kind == "u32|arr" and t.type != ValueType.ARRAY):
            if t.type != ValueType.UINT32:
                raise bad(key, f"expected u32, found {t}")
            raw[fld] = int(v)
        elif kind == "u32|arr":
            if t.elem not in INTEGER_TYPES or len(v) == 0:
                raise bad(key, f"expected u32 or a non-empty array of integers, found {t}")
            if len(set(int(x) for x in v)) != 1:
                raise bad(key, "per-layer values that differ are not supported")
            raw[fld] = int(v[0])
        elif kind == "f32":
            if t.type != ValueType.FLOAT32:
                raise bad(key, f"expected f32, found {t}")
            raw[fld] = float(v)
        elif kind == "f32|arr":
            if t.type == ValueType.FLOAT32:
                raw[fld] = (float(v),)
            elif t.type == ValueType.ARRAY and t.elem == ValueType.FLOAT32 and len(v) > 0:
                raw[fld] = tuple(float(x) for x in v)
            else:
                raise bad(key, f"expected f32 or a non-empty array of f32, found {t}")
        elif kind == "bool":
            if t.type != ValueType.BOOL:
                raise bad(key, f"expected bool, found {t}")
            raw[fld] = bool(v)
        elif kind == "str":
            if t.type != ValueType.STRING:
                raise bad(key, f"expected a string, found {t}")
            raw[fld] = str(v)
        elif kind == "i32arr":
            if t.type != ValueType.ARRAY or t.elem not in INTEGER_TYPES:
                raise bad(key, f"expected an array of integers, found {t}")
            raw[fld] = tuple(int(x) for x in v)

    if raw.pop("n_head_kv") != 1:
        raise bad(f"{ARCH}.attention.head_count_kv", "must be 1 (one shared K=V latent)")
    if raw.pop("value_dim") != raw["head_dim"]:
        raise bad(f"{ARCH}.attention.value_length", f"must equal key_length {raw['head_dim']}")
    for k in ("expert_group_count", "expert_group_used_count"):
        if raw.pop(k, 0) > 1:
            raise bad(f"{ARCH}.{k}", "group-limited routing is not part of deepseek4")
    block_count = raw.pop("block_count")
    declared = raw.pop("declared_nextn", 0)
    if not 0 <= declared < block_count:
        raise bad(f"{ARCH}.nextn_predict_layers", f"{declared} is not below block_count {block_count}")
    n_nextn = declared if declared and has_nextn_tensors(block_count - declared) else 0
    raw["n_layer"] = block_count - n_nextn
    raw["n_nextn"] = n_nextn
    raw["declared_nextn"] = declared
    if n_vocab is None:
        if "n_vocab" not in raw:
            raise bad(f"{ARCH}.vocab_size", "required when the file has no tokenizer")
    else:
        raw["n_vocab"] = n_vocab
    # as llama.cpp: an absent scaling type means "linear" (no YaRN on compressed layers: ext_factor 0), and an
    # absent or zero factor means 1
    raw.setdefault("rope_scaling_type", "linear")
    if raw.get("rope_scaling_factor", 0.0) == 0.0:
        raw["rope_scaling_factor"] = 1.0
    raw.setdefault("rope_orig_ctx", 0)
    raw.setdefault("swiglu_clamp_shexp", None)
    if raw["rope_orig_ctx"] == 0:
        raw["rope_orig_ctx"] = raw["n_ctx_train"]
    for name in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
        v = raw.get(name)
        if v is not None and len(v) not in (1, block_count):
            raise bad(f"{ARCH}.{name}", f"has {len(v)} values, expected 1 or block_count = {block_count}")
    try:
        return DSV4Params(**raw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def params_to_kv(p: DSV4Params) -> list[KV]:
    """The deepseek4 keys of `p`, typed as the upstream converter writes them."""
    a = ARCH
    out = [
        u32(f"{a}.context_length", p.n_ctx_train),
        u32(f"{a}.embedding_length", p.n_embd),
        u32(f"{a}.block_count", p.block_count),
        u32(f"{a}.nextn_predict_layers", p.n_nextn if p.declared_nextn is None else p.declared_nextn),
        u32(f"{a}.attention.head_count", p.n_head),
        u32(f"{a}.attention.head_count_kv", 1),
        u32(f"{a}.attention.key_length", p.head_dim),
        u32(f"{a}.attention.value_length", p.head_dim),
        u32(f"{a}.rope.dimension_count", p.rope_dim),
        f32(f"{a}.rope.freq_base", p.rope_freq_base),
        f32(f"{a}.attention.layer_norm_rms_epsilon", p.norm_eps),
        u32(f"{a}.attention.q_lora_rank", p.q_lora_rank),
        u32(f"{a}.attention.sliding_window", p.sliding_window),
        u32(f"{a}.attention.output_group_count", p.o_group_count),
        u32(f"{a}.attention.output_lora_rank", p.o_lora_rank),
        f32(f"{a}.attention.compress_rope_freq_base", p.compress_rope_freq_base),
        array(f"{a}.attention.compress_ratios", ValueType.INT32, list(p.compress_ratios)),
        u32(f"{a}.attention.indexer.head_count", p.indexer_n_head),
        u32(f"{a}.attention.indexer.key_length", p.indexer_head_dim),
        u32(f"{a}.attention.indexer.top_k", p.indexer_top_k),
        u32(f"{a}.expert_count", p.n_expert),
        u32(f"{a}.expert_used_count", p.n_expert_used),
        u32(f"{a}.expert_feed_forward_length", p.expert_ff),
        u32(f"{a}.expert_shared_count", p.n_expert_shared),
        f32(f"{a}.expert_weights_scale", p.expert_weights_scale),
        boolean(f"{a}.expert_weights_norm", p.expert_weights_norm),
        u32(f"{a}.expert_gating_func", p.expert_gating_func),
        u32(f"{a}.hash_layer_count", p.hash_layer_count),
        array(f"{a}.swiglu_clamp_exp", ValueType.FLOAT32, list(p.swiglu_clamp_exp)),
        u32(f"{a}.hyper_connection.count", p.hc_mult),
        u32(f"{a}.hyper_connection.sinkhorn_iterations", p.hc_sinkhorn_iters),
        f32(f"{a}.hyper_connection.epsilon", p.hc_eps),
        u32(f"{a}.vocab_size", p.n_vocab),
    ]
    if p.swiglu_clamp_shexp is not None:
        out.append(array(f"{a}.swiglu_clamp_shexp", ValueType.FLOAT32, list(p.swiglu_clamp_shexp)))
    if p.rope_scaling_type != "none":
        out += [
            string(f"{a}.rope.scaling.type", p.rope_scaling_type),
            f32(f"{a}.rope.scaling.factor", p.rope_scaling_factor),
            u32(f"{a}.rope.scaling.original_context_length", p.rope_orig_ctx),
            f32(f"{a}.rope.scaling.yarn_beta_fast", p.yarn_beta_fast),
            f32(f"{a}.rope.scaling.yarn_beta_slow", p.yarn_beta_slow),
        ]
    return out
