"""The exact tensor set of a deepseek4 model (docs/architecture.md §4), derived from its parameters.

Used by the loader (to validate a file) and by the writer (to produce one). Shapes are in ggml order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .params import DSV4Params


class Role(Enum):
    """What a tensor is for: decides the types a file may use and the types our writer picks."""

    EMBED = "embed"  # token_embd (row gather)
    OUTPUT = "output"  # LM head
    NORM = "norm"  # 1-D weights and biases, F32
    ATTN = "attn"  # attention projections (q_a, q_b, kv, output_a, output_b)
    HC = "hc"  # hyper-connection mixers (hc_*_fn, output_hc_fn)
    COMPRESSOR = "compressor"  # KV compressor and indexer compressor projections and their ape tables
    INDEXER = "indexer"  # lightning indexer projections
    ROUTER = "router"  # ffn_gate_inp
    TID2EID = "tid2eid"  # hash routing table, I32
    EXPERTS = "experts"  # routed expert stacks (3-D)
    SHARED = "shared"  # shared expert
    NEXTN = "nextn"  # MTP projection


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]
    role: Role
    alt_ne: tuple[int, ...] | None = None  # another accepted layout with identical bytes


def layer_tensors(p: DSV4Params, il: int) -> list[TensorSpec]:
    D, HCD, M = p.n_embd, p.hc_mult * p.n_embd, p.hc_mix
    d, H, G = p.head_dim, p.n_head, p.o_group_count
    F, E, S = p.expert_ff, p.n_expert, p.n_expert_shared
    ratio = p.ratio(il)
    b = f"blk.{il}."
    N, A, C = Role.NORM, Role.ATTN, Role.COMPRESSOR
    out = [
        TensorSpec(b + "attn_norm.weight", (D,), N),
        TensorSpec(b + "attn_sinks.weight", (H,), N),
        TensorSpec(b + "attn_q_a.weight", (D, p.q_lora_rank), A),
        TensorSpec(b + "attn_q_a_norm.weight", (p.q_lora_rank,), N),
        TensorSpec(b + "attn_q_b.weight", (p.q_lora_rank, H * d), A),
        TensorSpec(b + "attn_kv.weight", (D, d), A),
        TensorSpec(b + "attn_kv_a_norm.weight", (d,), N),
        TensorSpec(b + "attn_output_a.weight", (H * d // G, G * p.o_lora_rank), A, (H * d // G, p.o_lora_rank, G)),
        TensorSpec(b + "attn_output_b.weight", (G * p.o_lora_rank, D), A),
        TensorSpec(b + "hc_attn_fn.weight", (HCD, M), Role.HC),
        TensorSpec(b + "hc_attn_base.weight", (M,), N),
        TensorSpec(b + "hc_attn_scale.weight", (3,), N),
        TensorSpec(b + "hc_ffn_fn.weight", (HCD, M), Role.HC),
        TensorSpec(b + "hc_ffn_base.weight", (M,), N),
        TensorSpec(b + "hc_ffn_scale.weight", (3,), N),
        TensorSpec(b + "ffn_gate_inp.weight", (D, E), Role.ROUTER),
    ]
    if p.is_hash_layer(il):
        out.append(TensorSpec(b + "ffn_gate_tid2eid.weight", (p.n_expert_used, p.n_vocab), Role.TID2EID))
    else:
        out.append(TensorSpec(b + "exp_probs_b.bias", (E,), N))
    out += [
        TensorSpec(b + "ffn_norm.weight", (D,), N),
        TensorSpec(b + "ffn_gate_exps.weight", (D, F, E), Role.EXPERTS),
        TensorSpec(b + "ffn_up_exps.weight", (D, F, E), Role.EXPERTS),
        TensorSpec(b + "ffn_down_exps.weight", (F, D, E), Role.EXPERTS),
        TensorSpec(b + "ffn_gate_shexp.weight", (D, F * S), Role.SHARED),
        TensorSpec(b + "ffn_up_shexp.weight", (D, F * S), Role.SHARED),
        TensorSpec(b + "ffn_down_shexp.weight", (F * S, D), Role.SHARED),
    ]
    if ratio:
        coff = 2 if ratio == 4 else 1
        out += [
            TensorSpec(b + "attn_compressor_kv.weight", (D, coff * d), C),
            TensorSpec(b + "attn_compressor_gate.weight", (D, coff * d), C),
            TensorSpec(b + "attn_compressor_ape.weight", (coff * d, ratio), C),
            TensorSpec(b + "attn_compressor_norm.weight", (d,), N),
        ]
    if ratio == 4:
        di, Hi = p.indexer_head_dim, p.indexer_n_head
        out += [
            TensorSpec(b + "indexer.proj.weight", (D, Hi), Role.INDEXER),
            TensorSpec(b + "indexer.attn_q_b.weight", (p.q_lora_rank, Hi * di), Role.INDEXER),
            TensorSpec(b + "indexer_compressor_kv.weight", (D, 2 * di), C),
            TensorSpec(b + "indexer_compressor_gate.weight", (D, 2 * di), C),
            TensorSpec(b + "indexer_compressor_ape.weight", (2 * di, 4), C),
            TensorSpec(b + "indexer_compressor_norm.weight", (di,), N),
        ]
    if il >= p.n_layer:  # an MTP layer
        out += [
            TensorSpec(b + "nextn.eh_proj.weight", (2 * D, D), Role.NEXTN),
            TensorSpec(b + "nextn.enorm.weight", (D,), N),
            TensorSpec(b + "nextn.hnorm.weight", (D,), N),
        ]
    return out


# optional MTP tensors that fall back to the main model's (docs/architecture.md §4.4)
def optional_nextn_tensors(p: DSV4Params, il: int) -> list[TensorSpec]:
    D, V = p.n_embd, p.n_vocab
    b = f"blk.{il}.nextn."
    return [
        TensorSpec(b + "embed_tokens.weight", (D, V), Role.EMBED),
        TensorSpec(b + "shared_head_head.weight", (D, V), Role.OUTPUT),
        TensorSpec(b + "shared_head_norm.weight", (D,), Role.NORM),
    ]


def model_tensors(p: DSV4Params) -> list[TensorSpec]:
    """Every tensor a file with these parameters must hold, in the order our writer stores them."""
    D, V = p.n_embd, p.n_vocab
    out = [
        TensorSpec("token_embd.weight", (D, V), Role.EMBED),
        TensorSpec("output_norm.weight", (D,), Role.NORM),
        TensorSpec("output.weight", (D, V), Role.OUTPUT),
        TensorSpec("output_hc_fn.weight", (p.hc_mult * D, p.hc_mult), Role.HC),
        TensorSpec("output_hc_base.weight", (p.hc_mult,), Role.NORM),
        TensorSpec("output_hc_scale.weight", (1,), Role.NORM),
    ]
    for il in range(p.block_count):
        out += layer_tensors(p, il)
    return out
