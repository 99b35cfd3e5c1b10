"""The exact tensor set of a deepseek4 model (docs/architecture.md §4), derived from its parameters.

Used by the loader (to validate a file) and by the writer (to produce one). Shapes are in ggml order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .params import DSV4Params, LayerKind


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
    dest: str | None = None  # the weight-struct field the engine binds it to (engine/graph.pxd); None: unused there
    alt_ne: tuple[int, ...] | None = None  # another accepted layout with identical bytes


def layer_tensors(p: DSV4Params, il: int) -> list[TensorSpec]:
    D, HCD, M = p.n_embd, p.hc_mult * p.n_embd, p.hc_mix
    d, H, G = p.head_dim, p.n_head, p.o_group_count
    F, E, S = p.expert_ff, p.n_expert, p.n_expert_shared
    ratio = p.ratio(il)
    b = f"blk.{il}."
    N, A, C = Role.NORM, Role.ATTN, Role.COMPRESSOR
    out = [
        TensorSpec(b + "attn_norm.weight", (D,), N, "attn.norm"),
        TensorSpec(b + "attn_sinks.weight", (H,), N, "attn.sinks"),
        TensorSpec(b + "attn_q_a.weight", (D, p.q_lora_rank), A, "attn.q_a"),
        TensorSpec(b + "attn_q_a_norm.weight", (p.q_lora_rank,), N, "attn.q_a_norm"),
        TensorSpec(b + "attn_q_b.weight", (p.q_lora_rank, H * d), A, "attn.q_b"),
        TensorSpec(b + "attn_kv.weight", (D, d), A, "attn.kv"),
        TensorSpec(b + "attn_kv_a_norm.weight", (d,), N, "attn.kv_norm"),
        TensorSpec(
            b + "attn_output_a.weight", (H * d // G, G * p.o_lora_rank), A, "attn.o_a", (H * d // G, p.o_lora_rank, G)
        ),
        TensorSpec(b + "attn_output_b.weight", (G * p.o_lora_rank, D), A, "attn.o_b"),
        TensorSpec(b + "hc_attn_fn.weight", (HCD, M), Role.HC, "hc_attn.fn"),
        TensorSpec(b + "hc_attn_base.weight", (M,), N, "hc_attn.base"),
        TensorSpec(b + "hc_attn_scale.weight", (3,), N, "hc_attn.scale"),
        TensorSpec(b + "hc_ffn_fn.weight", (HCD, M), Role.HC, "hc_ffn.fn"),
        TensorSpec(b + "hc_ffn_base.weight", (M,), N, "hc_ffn.base"),
        TensorSpec(b + "hc_ffn_scale.weight", (3,), N, "hc_ffn.scale"),
        TensorSpec(b + "ffn_gate_inp.weight", (D, E), Role.ROUTER, "ffn.gate_inp"),
    ]
    if p.is_hash_layer(il):
        out.append(TensorSpec(b + "ffn_gate_tid2eid.weight", (p.n_expert_used, p.n_vocab), Role.TID2EID, "ffn.tid2eid"))
    else:
        out.append(TensorSpec(b + "exp_probs_b.bias", (E,), N, "ffn.probs_b"))
    out += [
        TensorSpec(b + "ffn_norm.weight", (D,), N, "ffn.norm"),
        TensorSpec(b + "ffn_gate_exps.weight", (D, F, E), Role.EXPERTS, "ffn.gate_exps"),
        TensorSpec(b + "ffn_up_exps.weight", (D, F, E), Role.EXPERTS, "ffn.up_exps"),
        TensorSpec(b + "ffn_down_exps.weight", (F, D, E), Role.EXPERTS, "ffn.down_exps"),
        TensorSpec(b + "ffn_gate_shexp.weight", (D, F * S), Role.SHARED, "ffn.gate_sh"),
        TensorSpec(b + "ffn_up_shexp.weight", (D, F * S), Role.SHARED, "ffn.up_sh"),
        TensorSpec(b + "ffn_down_shexp.weight", (F * S, D), Role.SHARED, "ffn.down_sh"),
    ]
    if ratio != LayerKind.SWA:
        coff = 2 if ratio == LayerKind.CSA else 1
        out += [
            TensorSpec(b + "attn_compressor_kv.weight", (D, coff * d), C, "attn.comp.kv"),
            TensorSpec(b + "attn_compressor_gate.weight", (D, coff * d), C, "attn.comp.gate"),
            TensorSpec(b + "attn_compressor_ape.weight", (coff * d, ratio), C, "attn.comp.ape"),
            TensorSpec(b + "attn_compressor_norm.weight", (d,), N, "attn.comp.norm"),
        ]
    if ratio == LayerKind.CSA:
        di, Hi = p.indexer_head_dim, p.indexer_n_head
        out += [
            TensorSpec(b + "indexer.proj.weight", (D, Hi), Role.INDEXER, "attn.idx.proj"),
            TensorSpec(b + "indexer.attn_q_b.weight", (p.q_lora_rank, Hi * di), Role.INDEXER, "attn.idx.q_b"),
            TensorSpec(b + "indexer_compressor_kv.weight", (D, 2 * di), C, "attn.idx.comp.kv"),
            TensorSpec(b + "indexer_compressor_gate.weight", (D, 2 * di), C, "attn.idx.comp.gate"),
            TensorSpec(b + "indexer_compressor_ape.weight", (2 * di, 4), C, "attn.idx.comp.ape"),
            TensorSpec(b + "indexer_compressor_norm.weight", (di,), N, "attn.idx.comp.norm"),
        ]
    if il >= p.n_layer:  # an MTP layer
        out += [
            TensorSpec(b + "nextn.eh_proj.weight", (2 * D, D), Role.NEXTN, "mtp.eh_proj"),
            TensorSpec(b + "nextn.enorm.weight", (D,), N, "mtp.enorm"),
            TensorSpec(b + "nextn.hnorm.weight", (D,), N, "mtp.hnorm"),
        ]
    return out


# optional MTP tensors that fall back to the main model's (docs/architecture.md §4.4)
def optional_nextn_tensors(p: DSV4Params, il: int) -> list[TensorSpec]:
    D, V = p.n_embd, p.n_vocab
    b = f"blk.{il}.nextn."
    return [
        TensorSpec(b + "embed_tokens.weight", (D, V), Role.EMBED, "mtp.embed"),
        TensorSpec(b + "shared_head_head.weight", (D, V), Role.OUTPUT, "mtp.head"),
        TensorSpec(b + "shared_head_norm.weight", (D,), Role.NORM, "mtp.head_norm"),
    ]


def global_tensors(p: DSV4Params) -> list[TensorSpec]:
    """The tensors outside the layers: embedding, output head and norm, the final hyper-connection collapse."""
    D, V = p.n_embd, p.n_vocab
    return [
        TensorSpec("token_embd.weight", (D, V), Role.EMBED, "tok_embd"),
        TensorSpec("output_norm.weight", (D,), Role.NORM, "out_norm"),
        TensorSpec("output.weight", (D, V), Role.OUTPUT, "output"),
        TensorSpec("output_hc_fn.weight", (p.hc_mult * D, p.hc_mult), Role.HC, "hc_fn"),
        TensorSpec("output_hc_base.weight", (p.hc_mult,), Role.NORM, "hc_base"),
        TensorSpec("output_hc_scale.weight", (1,), Role.NORM, "hc_scale"),
    ]


def model_tensors(p: DSV4Params) -> list[TensorSpec]:
    """Every tensor a file with these parameters must hold, in the order our writer stores them."""
    out = global_tensors(p)
    for il in range(p.block_count):
        out += layer_tensors(p, il)
    return out
