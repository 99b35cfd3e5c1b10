"""The deepseek4 network in PyTorch, for training: the forward pass of docs/design.md's engine (tests/numpy_dsv4.py is
the same math one token at a time), computed for a whole batch of sequences at once, plus the MTP (nextn) layer.

Every tensor is held under its GGUF name, in numpy order (the reverse of ggml's `ne`), so exporting is a copy
(train/export.py). What training adds to the inference math:
- the lightning indexer's top-k is not differentiable: as DeepSeek does (V3.2), the indexer is trained on its own
  loss, the KL divergence from the main attention's distribution over the visible CSA entries (summed over heads,
  renormalised) to the indexer's softmax, with the indexer's inputs detached from the main graph;
- learned routing keeps its selection bias (`exp_probs_b`) out of the gradient and moves it after each step by the
  auxiliary-loss-free rule (bias += u * sign(mean load - expert load)), DeepSeek V3's balancing;
- hash-routed layers use a fixed random token -> experts table (`ffn_gate_tid2eid`);
- the MTP layer takes the main model's last stream at position i and the embedding of token i+1 and predicts token
  i+2 (DeepSeek V3's next-next-token loss, weight `mtp_weight`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_dsv4.engine.topk import heap_top_k
from llama_dsv4.model.params import DSV4Params, LayerKind
from llama_dsv4.model.tensors import Role, model_tensors
from llama_dsv4.model.writer import Init, random_values


def _key(name: str) -> str:
    return name.replace(".", "__")


def rms(x: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, eps)


def rope_table(p: DSV4Params, il: int, n_pos: int) -> tuple[Tensor, Tensor]:
    """(cos, sin) [n_pos, rope_dim/2] of layer il's RoPE (YaRN on compressed layers), magnitude scale included."""
    n_ctx_orig, base, fs, ef, af, bf, bs = p.rope(il)
    n_rot = p.rope_dim
    i = np.arange(n_rot // 2)
    theta = np.arange(n_pos)[:, None] * base ** (-2.0 * i / n_rot)
    ang, msc = fs * theta, af
    if ef:

        def corr(beta: float) -> float:
            return n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(0.0, math.floor(corr(bf))), min(n_rot - 1.0, math.ceil(corr(bs)))
        mix = (1 - np.clip((i - lo) / max(0.001, hi - lo), 0, 1)) * ef
        ang = fs * theta * (1 - mix) + theta * mix
        msc = af * (1 + 0.1 * math.log(1 / fs))
    return torch.tensor(np.cos(ang) * msc), torch.tensor(np.sin(ang) * msc)


def rope(x: Tensor, cos: Tensor, sin: Tensor, n_rot: int, inverse: bool = False) -> Tensor:
    """Rotate adjacent pairs of the last n_rot dims of x [..., n, (heads,) d]; cos/sin [n, n_rot/2] broadcast over
    the axes between the position axis and the last."""
    d = x.shape[-1]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    if x.dim() == 4:  # [B, n, H, d]
        c, s = c[:, None, :], s[:, None, :]
    if inverse:
        s = -s
    z0, z1 = x[..., d - n_rot :: 2], x[..., d - n_rot + 1 :: 2]
    rot = torch.stack((z0 * c - z1 * s, z0 * s + z1 * c), dim=-1).flatten(-2)
    return torch.cat((x[..., : d - n_rot], rot), dim=-1)


def window_scores(q: Tensor, kv: Tensor, W: int, scale: float) -> tuple[Tensor, Tensor]:
    """The sliding window's scores in blocks of W queries, each block seeing its own W keys and the W before them:
    ([B, H, T, 2W] with -inf outside the window, the blocks' keys [B, T/W, 2W, d]) for q [B, T, H, d] and the
    shared key/value latent kv [B, T, d]; the same softmax as scores over all [T, T] pairs, at 2W/T of the work."""
    T = q.shape[1]
    nblk = -(-T // W)
    kb = F.pad(kv, (0, 0, 0, nblk * W - T)).unflatten(1, (nblk, W))  # [B, nblk, W, d]
    kw = torch.cat((F.pad(kb[:, :-1], (0, 0, 0, 0, 1, 0)), kb), 2)  # [B, nblk, 2W, d]: the block before, this one
    qb = F.pad(q, (0, 0, 0, 0, 0, nblk * W - T)).unflatten(1, (nblk, W))  # [B, nblk, W, H, d]
    s = torch.einsum("bnwhd,bnkd->bhnwk", qb, kw) * scale
    w, k = torch.arange(W)[:, None], torch.arange(2 * W)[None, :]
    band = ((k > w) & (k <= W + w))[None].repeat(nblk, 1, 1)  # key k of block n is at (n - 1) W + k, query w at n W + w
    band[0, :, :W] = False  # the block before the first is not there
    return s.masked_fill(~band, -math.inf).flatten(2, 3)[:, :, :T], kw


def window_values(prob: Tensor, kw: Tensor) -> Tensor:
    """The window's share of the attention output [B, T, H, d] from its probabilities [B, H, T, 2W] and the blocks'
    keys (which are the values) of window_scores."""
    T = prob.shape[2]
    nblk, W = kw.shape[1], kw.shape[2] // 2
    pw = F.pad(prob, (0, 0, 0, nblk * W - T)).unflatten(2, (nblk, W))  # [B, H, nblk, W, 2W]
    return torch.einsum("bhnwk,bnkd->bnwhd", pw, kw).flatten(1, 2)[:, :T]


class DSV4(nn.Module):
    """The network; parameters named as the GGUF tensors (dots replaced by '__')."""

    def __init__(self, p: DSV4Params, seed: int = 0, init: Init | None = None, max_pos: int = 4096) -> None:
        super().__init__()
        self.p = p
        self.max_pos = max_pos
        self.exact_top_k = False  # True: the indexer breaks ties as the engine does (slow; for agreement checks)
        self.dense_window = False  # True: the window's scores over all [T, T] pairs (slow; for checks and timings)
        self.routes: dict[int, list[Tensor]] | None = None  # a dict: each layer's expert choices [N, k] recorded
        self.w = nn.ParameterDict()
        for spec in model_tensors(p):
            v = random_values(spec, p, seed, init or Init())
            if spec.role == Role.TID2EID:
                self.register_buffer(_key(spec.name), torch.from_numpy(v.astype(np.int64)))
            elif spec.name.endswith("exp_probs_b.bias"):
                self.register_buffer(_key(spec.name), torch.from_numpy(v.copy()))
            else:
                if spec.name.endswith("attn_output_a.weight"):
                    v = v.reshape(-1, v.shape[-1])
                self.w[_key(spec.name)] = nn.Parameter(torch.from_numpy(v.copy()))
        for il in range(p.block_count):
            c, s = rope_table(p, il, max_pos)
            self.register_buffer(f"cos{il}", c.float(), persistent=False)
            self.register_buffer(f"sin{il}", s.float(), persistent=False)

    # ---- access by GGUF name
    def t(self, name: str) -> Tensor:
        k = _key(name)
        return self.w[k] if k in self.w else getattr(self, k)

    def tensors(self) -> dict[str, np.ndarray]:
        """Every GGUF tensor's values (numpy order, float32; int32 for tid2eid), for export."""
        out = {}
        for spec in model_tensors(self.p):
            v = self.t(spec.name).detach().cpu().numpy()
            out[spec.name] = v.astype(np.int32) if spec.role == Role.TID2EID else v.astype(np.float32)
        return out

    def load_tensors(self, values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, v in values.items():
                t = self.t(name)
                t.copy_(torch.from_numpy(np.asarray(v)).reshape(t.shape).to(t.dtype))

    # ---- hyper-connections (docs/architecture.md §7)
    def hc_pre(self, S: Tensor, pre: str) -> tuple[Tensor, Tensor, Tensor]:
        p = self.p
        hc = p.hc_mult
        z = rms(S.flatten(-2), p.norm_eps)
        mix = z @ self.t(pre + "_fn.weight").T
        scale, base = self.t(pre + "_scale.weight"), self.t(pre + "_base.weight")
        a = torch.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + p.hc_eps
        post = 2 * torch.sigmoid(mix[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
        C = (mix[..., 2 * hc :] * scale[2] + base[2 * hc :]).unflatten(-1, (hc, hc))  # [src][dst]
        C = torch.softmax(C, dim=-1) + p.hc_eps
        C = C / (C.sum(-2, keepdim=True) + p.hc_eps)
        for _ in range(p.hc_sinkhorn_iters - 1):
            C = C / (C.sum(-1, keepdim=True) + p.hc_eps)
            C = C / (C.sum(-2, keepdim=True) + p.hc_eps)
        return (S * a[..., None]).sum(-2), post, C

    @staticmethod
    def hc_post(f: Tensor, res: Tensor, post: Tensor, C: Tensor) -> Tensor:
        return post[..., :, None] * f[..., None, :] + torch.einsum("...sr,...sd->...rd", C, res)

    def hc_head(self, S: Tensor) -> Tensor:
        p = self.p
        mix = rms(S.flatten(-2), p.norm_eps) @ self.t("output_hc_fn.weight").T
        a = torch.sigmoid(mix * self.t("output_hc_scale.weight")[0] + self.t("output_hc_base.weight")) + p.hc_eps
        return (S * a[..., None]).sum(-2)

    # ---- compressors (docs/architecture.md §8.3): every complete block of the batch's sequences at once
    def compress(self, il: int, x: Tensor, pre: str, width: int) -> Tensor:
        p = self.p
        R = p.ratio(il)
        nb = x.shape[1] // R
        kv = (x @ self.t(pre + "_kv.weight").T)[:, : nb * R].unflatten(1, (nb, R))  # [B, nb, R, coff*w]
        ape = self.t(pre + "_ape.weight")
        sc = (x @ self.t(pre + "_gate.weight").T)[:, : nb * R].unflatten(1, (nb, R)) + ape
        if R == LayerKind.CSA:  # slots: the previous block's first half of channels, then this block's second
            pk = torch.cat((torch.zeros_like(kv[:, :1, :, :width]), kv[:, :-1, :, :width]), 1)
            ps = torch.cat((torch.full_like(sc[:, :1, :, :width], -math.inf), sc[:, :-1, :, :width]), 1)
            kv = torch.cat((pk, kv[..., width:]), 2)
            sc = torch.cat((ps, sc[..., width:]), 2)
        e = (torch.softmax(sc, dim=2) * kv).sum(2)  # [B, nb, width]
        e = rms(e, p.norm_eps) * self.t(pre + "_norm.weight")
        starts = torch.arange(nb) * R
        return rope(e, getattr(self, f"cos{il}")[starts], getattr(self, f"sin{il}")[starts], p.rope_dim)

    # ---- attention (docs/architecture.md §8)
    def attention(self, il: int, x: Tensor, aux: dict[str, Tensor]) -> Tensor:
        p = self.p
        b = f"blk.{il}."
        B, T, _ = x.shape
        H, d, R, W = p.n_head, p.head_dim, p.ratio(il), p.sliding_window
        cos, sin = getattr(self, f"cos{il}")[:T], getattr(self, f"sin{il}")[:T]
        qr = rms(x @ self.t(b + "attn_q_a.weight").T, p.norm_eps) * self.t(b + "attn_q_a_norm.weight")
        q = rms((qr @ self.t(b + "attn_q_b.weight").T).unflatten(-1, (H, d)), p.norm_eps)
        q = rope(q, cos, sin, p.rope_dim)  # [B, T, H, d]
        kv = rms(x @ self.t(b + "attn_kv.weight").T, p.norm_eps) * self.t(b + "attn_kv_a_norm.weight")
        kv = rope(kv, cos, sin, p.rope_dim)  # [B, T, d]
        pos = torch.arange(T)
        scale = 1.0 / math.sqrt(d)
        if self.dense_window:
            s = torch.einsum("bthd,bsd->bhts", q, kv) * scale
            s = s.masked_fill(~((pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < W)), -math.inf)
        else:
            s, kw = window_scores(q, kv, W, scale)
        logits = [s]
        e = None
        if R and T // R:
            e = self.compress(il, x, b + "attn_compressor", d)  # [B, nb, d]
            nb = e.shape[1]
            vis = torch.arange(nb)[None, :] < ((pos + 1) // R)[:, None]  # [T, nb]
            sc = torch.einsum("bthd,bnd->bhtn", q, e) * scale
            if R == LayerKind.CSA:
                sel = self.indexer(il, x, qr, vis, sc, aux)  # [B, T, nb]
                mask = vis[None] & sel
                mask = mask[:, None]
            else:
                mask = vis[None, None]
            logits.append(sc.masked_fill(~mask, -math.inf))
        sink = self.t(b + "attn_sinks.weight")[None, :, None, None].expand(B, H, T, 1)
        prob = torch.softmax(torch.cat([*logits, sink], dim=-1), dim=-1)
        n_win = s.shape[-1]
        if self.dense_window:
            o = torch.einsum("bhts,bsd->bthd", prob[..., :n_win], kv)
        else:
            o = window_values(prob[..., :n_win], kw)
        if e is not None:
            o = o + torch.einsum("bhtn,bnd->bthd", prob[..., n_win:-1], e)
        o = rope(o, cos, sin, p.rope_dim, inverse=True)
        G, Ro = p.o_group_count, p.o_lora_rank
        o_a = self.t(b + "attn_output_a.weight").unflatten(0, (G, Ro))  # [G, Ro, H*d/G]
        a = torch.einsum("btgk,grk->btgr", o.reshape(B, T, G, -1), o_a).flatten(-2)
        return a @ self.t(b + "attn_output_b.weight").T

    def indexer(self, il: int, x: Tensor, qr: Tensor, vis: Tensor, sc: Tensor, aux: dict[str, Tensor]) -> Tensor:
        """The lightning indexer's selection [B, T, nb] (bool); adds its distillation loss to aux['indexer']."""
        p = self.p
        b = f"blk.{il}."
        T = x.shape[1]
        Hi, di = p.indexer_n_head, p.indexer_head_dim
        xd, qd = (x, qr) if not self.training else (x.detach(), qr.detach())
        cos, sin = getattr(self, f"cos{il}")[:T], getattr(self, f"sin{il}")[:T]
        iq = rope((qd @ self.t(b + "indexer.attn_q_b.weight").T).unflatten(-1, (Hi, di)), cos, sin, p.rope_dim)
        iw = (xd @ self.t(b + "indexer.proj.weight").T) / math.sqrt(di * Hi)
        lid = self.compress(il, xd, b + "indexer_compressor", di)
        score = (torch.relu(torch.einsum("bthd,bnd->bthn", iq, lid)) * iw[..., None]).sum(2)  # [B, T, nb]
        score = score.masked_fill(~vis[None], -1e30)  # finite: a row with nothing visible stays a distribution
        nb = score.shape[-1]
        k = min(p.indexer_top_k, nb)
        if self.exact_top_k:  # the engine's choice among tied scores (the relu makes exact ties common)
            sel = torch.zeros_like(score, dtype=torch.bool)
            n_vis = vis.sum(-1).tolist()
            sc_np = score.detach().cpu().numpy()
            for bi in range(score.shape[0]):
                for t in range(T):
                    if n_vis[t]:
                        sel[bi, t, heap_top_k(sc_np[bi, t, : n_vis[t]], min(k, n_vis[t]))] = True
        else:
            top = torch.topk(score, k, dim=-1).indices
            sel = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        if self.training:
            any_vis = vis.any(-1)  # tokens that see at least one entry
            target = torch.softmax(sc.detach().masked_fill(~vis[None, None], -1e30), -1).sum(1)
            target = target * vis[None] / target.sum(-1, keepdim=True)
            logq = torch.log_softmax(score, -1)
            kl = (target * (torch.log(target.clamp_min(1e-12)) - logq)).sum(-1)
            kl = torch.where(any_vis, kl, 0.0)  # the mean over tokens that see something, without a boolean index
            aux["indexer"] = aux.get("indexer", 0) + kl.sum() / (kl.shape[0] * any_vis.sum())
        return sel

    # ---- mixture of experts (docs/architecture.md §9)
    def moe(self, il: int, x: Tensor, tok: Tensor, aux: dict[str, Tensor]) -> Tensor:
        p = self.p
        b = f"blk.{il}."
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        prob = torch.sqrt(F.softplus(x @ self.t(b + "ffn_gate_inp.weight").T))  # [N, E]
        k = p.n_expert_used
        if p.is_hash_layer(il):
            sel = self.t(b + "ffn_gate_tid2eid.weight")[tok.reshape(-1)]
        else:
            sel = torch.topk(prob.detach() + self.t(b + "exp_probs_b.bias"), k, dim=-1).indices
            if self.training:
                flat = sel.reshape(-1)  # bincount's counts, with a shape that does not depend on the data
                aux[f"load{il}"] = torch.zeros(p.n_expert, dtype=torch.int64).index_add_(0, flat, torch.ones_like(flat))
        if self.routes is not None:
            self.routes.setdefault(il, []).append(sel.detach())
        wts = prob.gather(1, sel)
        if p.expert_weights_norm:
            wts = wts / wts.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        wts = wts * p.expert_weights_scale

        def ffn(xs: Tensor, gate: Tensor, up: Tensor, down: Tensor, lim: float) -> Tensor:
            g, u = xs @ gate.T, xs @ up.T
            if lim > 1e-6:
                g, u = torch.clamp(g, max=lim), torch.clamp(u, -lim, lim)
            return (F.silu(g) * u) @ down.T

        gate, up, down = (self.t(b + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        y = torch.zeros_like(x)
        for e in range(p.n_expert):
            rows, slot = torch.nonzero(sel == e, as_tuple=True)  # no branch on rows.numel(): torch.compile traces it
            h = ffn(x[rows], gate[e], up[e], down[e], p.clamp_exp(il))
            y = y.index_add(0, rows, h * wts[rows, slot, None])
        sh = ffn(x, *(self.t(b + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down")), p.clamp_shexp(il))
        return (y + sh).reshape(shape)

    def block(self, il: int, S: Tensor, tok: Tensor, aux: dict[str, Tensor]) -> Tensor:
        p = self.p
        b = f"blk.{il}."
        a, post, C = self.hc_pre(S, b + "hc_attn")
        a = rms(a, p.norm_eps) * self.t(b + "attn_norm.weight")
        S = self.hc_post(self.attention(il, a, aux), S, post, C)
        f, post, C = self.hc_pre(S, b + "hc_ffn")
        f = rms(f, p.norm_eps) * self.t(b + "ffn_norm.weight")
        return self.hc_post(self.moe(il, f, tok, aux), S, post, C)

    def head(self, S: Tensor) -> Tensor:
        y = rms(self.hc_head(S), self.p.norm_eps) * self.t("output_norm.weight")
        return y @ self.t("output.weight").T

    def forward(self, tok: Tensor, mtp: bool = False) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """tok [B, T] (positions 0..T-1) -> (logits [B, T, V], MTP logits [B, T-1, V] for tokens 2..T or None,
        aux: the indexer's loss and the routed layers' expert loads)."""
        p = self.p
        if tok.shape[1] > self.max_pos:
            raise ValueError(f"sequence of {tok.shape[1]} tokens exceeds max_pos {self.max_pos}")
        aux: dict[str, Tensor] = {}
        x = self.t("token_embd.weight")[tok]
        S = x[:, :, None, :].expand(-1, -1, p.hc_mult, -1)
        for il in range(p.n_layer):
            S = self.block(il, S, tok, aux)
        logits = self.head(S)
        mtp_logits = None
        if mtp and p.n_nextn:
            il = p.n_layer
            b = f"blk.{il}.nextn."
            nxt = tok[:, 1:]
            e = rms(self.t("token_embd.weight")[nxt], p.norm_eps) * self.t(b + "enorm.weight")
            h = rms(S[:, :-1], p.norm_eps) * self.t(b + "hnorm.weight")
            Sm = torch.cat((e[:, :, None, :].expand_as(h), h), -1) @ self.t(b + "eh_proj.weight").T
            mtp_logits = self.head(self.block(il, Sm, nxt, aux))
        return logits, mtp_logits, aux

    @torch.no_grad()
    def update_bias(self, aux: dict[str, Tensor], rate: float) -> None:
        """DeepSeek V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others."""
        for il in range(self.p.block_count):
            load = aux.get(f"load{il}")
            if load is not None:
                bias = self.t(f"blk.{il}.exp_probs_b.bias")
                bias += rate * torch.sign(load.float().mean() - load.float())


def count_params(p: DSV4Params) -> tuple[int, int]:
    """(total, active per token) parameter counts of the main model plus the MTP layer, tid2eid excluded."""
    total = active = 0
    for spec in model_tensors(p):
        if spec.role == Role.TID2EID:
            continue
        n = int(np.prod(spec.ne))
        total += n
        active += n * p.n_expert_used // p.n_expert if spec.role == Role.EXPERTS else n
    return total, active
