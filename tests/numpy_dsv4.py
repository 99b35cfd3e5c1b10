"""A plain numpy (float64) DeepSeek V4 forward pass, one token at a time, written from docs/architecture.md
§5-10 as directly as possible. It is slow and independent of ggml: tests use it to check the engine's graph, and it
was checked against the reference implementation once (see tests/data/README.md)."""

from __future__ import annotations

import math

import numpy as np

from llama_dsv4.engine.topk import heap_top_k
from llama_dsv4.model.loader import ModelFile
from llama_dsv4.model.params import DSV4Params


def rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def rope_params(p: DSV4Params, il: int) -> dict:
    if p.ratio(il) == 0:
        return dict(base=p.rope_freq_base, fs=1.0, ef=0.0, af=1.0, n_orig=0, bf=0.0, bs=0.0)
    fs = 1.0 / p.rope_scaling_factor
    ef = 1.0 if p.rope_scaling_type == "yarn" else 0.0
    af = 1.0 / (1.0 + 0.1 * math.log(1.0 / fs)) if ef else 1.0
    return dict(
        base=p.compress_rope_freq_base,
        fs=fs,
        ef=ef,
        af=af,
        n_orig=p.rope_orig_ctx,
        bf=p.yarn_beta_fast,
        bs=p.yarn_beta_slow,
    )


def rope_tail(
    x: np.ndarray,
    pos: int,
    n_rot: int,
    base: float,
    fs: float,
    ef: float,
    af: float,
    n_orig: int,
    bf: float,
    bs: float,
    inverse: bool = False,
) -> np.ndarray:
    """RoPE (adjacent pairs, YaRN) on the last n_rot dims of each row of x [..., d] at one position."""
    out = x.copy()
    d = x.shape[-1]
    i = np.arange(n_rot // 2)
    theta = pos * base ** (-2.0 * i / n_rot)
    ang, msc = fs * theta, af
    if ef:

        def corr(beta: float) -> float:
            return n_rot * math.log(n_orig / (beta * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(0.0, math.floor(corr(bf))), min(n_rot - 1.0, math.ceil(corr(bs)))
        mix = (1 - np.clip((i - lo) / max(0.001, hi - lo), 0, 1)) * ef
        ang = fs * theta * (1 - mix) + theta * mix
        msc = af * (1 + 0.1 * math.log(1 / fs))
    c, s = np.cos(ang) * msc, np.sin(ang) * msc * (-1 if inverse else 1)
    z0, z1 = x[..., d - n_rot :: 2], x[..., d - n_rot + 1 :: 2]
    out[..., d - n_rot :: 2] = z0 * c - z1 * s
    out[..., d - n_rot + 1 :: 2] = z0 * s + z1 * c
    return out


class NumpyDSV4:
    """Sequential reference: feed tokens one at a time with `step(token)`, get the logits of that position."""

    def __init__(self, model: ModelFile, fa_f16: bool = True) -> None:
        # fa_f16: attention as llama.cpp's flash-attention path computes it (queries, keys and values rounded to
        # f16, the rest exact); False: exact attention
        self.fa_f16 = fa_f16
        self.p = p = model.params
        self.w = {
            n: model.array(n).astype(np.float64) if model.tensors[n].type != 26 else model.array(n)
            for n in model.tensors
        }
        for il in range(p.n_layer):  # accept the 3-D layout of attn_output_a
            n = f"blk.{il}.attn_output_a.weight"
            self.w[n] = self.w[n].reshape(-1, self.w[n].shape[-1])
        self.pos = 0
        self.raw: list[list[np.ndarray]] = [[] for _ in range(p.n_layer)]
        self.comp: list[list[np.ndarray]] = [[] for _ in range(p.n_layer)]  # CSA / HCA entries
        self.lid: list[list[np.ndarray]] = [[] for _ in range(p.n_layer)]
        self.rows: list[dict] = [{} for _ in range(p.n_layer)]  # position -> (ckv, csc[, ikv, isc])
        # when a list: ("indexer", pos, layer, scores, q.k per head) and ("router", pos, layer, biased scores)
        self.trace: list[tuple] | None = None

    def clone(self) -> NumpyDSV4:
        """A copy of the sequence state that shares the (read-only) weights."""
        c = object.__new__(NumpyDSV4)
        c.p, c.w, c.pos, c.fa_f16 = self.p, self.w, self.pos, self.fa_f16
        c.raw = [list(x) for x in self.raw]
        c.comp = [list(x) for x in self.comp]
        c.lid = [list(x) for x in self.lid]
        c.rows = [dict(x) for x in self.rows]
        c.trace = [] if self.trace is not None else None
        return c

    # ---- hyper-connections (docs/architecture.md §7)
    def hc_pre(self, S: np.ndarray, pre: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, w = self.p, self.w
        z = rms(S.reshape(-1), p.norm_eps)
        mix = w[pre + "_fn.weight"] @ z
        scale, base = w[pre + "_scale.weight"], w[pre + "_base.weight"]
        hc = p.hc_mult
        a = sigmoid(mix[:hc] * scale[0] + base[:hc]) + p.hc_eps
        post = 2 * sigmoid(mix[hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
        C = (mix[2 * hc :] * scale[2] + base[2 * hc :]).reshape(hc, hc)  # [src][dst]
        C = np.exp(C - C.max(axis=1, keepdims=True))
        C = C / C.sum(axis=1, keepdims=True) + p.hc_eps
        C = C / (C.sum(axis=0, keepdims=True) + p.hc_eps)
        for _ in range(p.hc_sinkhorn_iters - 1):
            C = C / (C.sum(axis=1, keepdims=True) + p.hc_eps)
            C = C / (C.sum(axis=0, keepdims=True) + p.hc_eps)
        return a @ S, post, C

    @staticmethod
    def hc_post(f: np.ndarray, res: np.ndarray, post: np.ndarray, C: np.ndarray) -> np.ndarray:
        return post[:, None] * f[None, :] + C.T @ res

    # ---- compressors (docs/architecture.md §8.3)
    def entry(self, il: int, b: int, R: int, overlap: bool, idx: int, width: int, norm: str) -> np.ndarray:
        rows = self.rows[il]
        kv = np.array([rows[t][idx] for t in range(b * R, b * R + R)])
        sc = np.array([rows[t][idx + 1] for t in range(b * R, b * R + R)])
        if overlap:
            if b == 0:
                pkv, psc = np.zeros((R, width)), np.full((R, width), -np.inf)
            else:
                pkv = np.array([rows[t][idx][:width] for t in range(b * R - R, b * R)])
                psc = np.array([rows[t][idx + 1][:width] for t in range(b * R - R, b * R)])
            kv = np.concatenate([pkv, kv[:, width:]])
            sc = np.concatenate([psc, sc[:, width:]])
        wts = np.exp(sc - sc.max(axis=0))
        wts /= wts.sum(axis=0)
        e = rms((wts * kv).sum(axis=0), self.p.norm_eps) * self.w[norm]
        return rope_tail(e, b * R, self.p.rope_dim, **rope_params(self.p, il))

    # ---- attention (docs/architecture.md §8)
    def attention(self, il: int, x: np.ndarray, pos: int) -> np.ndarray:
        p, w, b = self.p, self.w, f"blk.{il}."
        rp = rope_params(p, il)
        H, d, R = p.n_head, p.head_dim, p.ratio(il)
        qr = rms(w[b + "attn_q_a.weight"] @ x, p.norm_eps) * w[b + "attn_q_a_norm.weight"]
        q = rms((w[b + "attn_q_b.weight"] @ qr).reshape(H, d), p.norm_eps)
        q = rope_tail(q, pos, p.rope_dim, **rp)
        kv = rms(w[b + "attn_kv.weight"] @ x, p.norm_eps) * w[b + "attn_kv_a_norm.weight"]
        kv = rope_tail(kv, pos, p.rope_dim, **rp)
        self.raw[il].append(kv)
        keys = self.raw[il][max(0, pos - p.sliding_window + 1) :]
        if R:
            ckv = w[b + "attn_compressor_kv.weight"] @ x
            csc = w[b + "attn_compressor_gate.weight"] @ x + w[b + "attn_compressor_ape.weight"][pos % R]
            row = [ckv, csc]
            if R == 4:
                ikv = w[b + "indexer_compressor_kv.weight"] @ x
                isc = w[b + "indexer_compressor_gate.weight"] @ x + w[b + "indexer_compressor_ape.weight"][pos % 4]
                row += [ikv, isc]
            self.rows[il][pos] = row
            if (pos + 1) % R == 0:
                blk = pos // R
                self.comp[il].append(self.entry(il, blk, R, R == 4, 0, d, b + "attn_compressor_norm.weight"))
                if R == 4:
                    self.lid[il].append(
                        self.entry(il, blk, 4, True, 2, p.indexer_head_dim, b + "indexer_compressor_norm.weight")
                    )
            n_vis = (pos + 1) // R
            if R == 128:
                keys = keys + self.comp[il][:n_vis]
            elif n_vis:
                Hi, di = p.indexer_n_head, p.indexer_head_dim
                iq = rope_tail((w[b + "indexer.attn_q_b.weight"] @ qr).reshape(Hi, di), pos, p.rope_dim, **rp)
                iw = (w[b + "indexer.proj.weight"] @ x) / math.sqrt(di * Hi)
                lid = np.array(self.lid[il][:n_vis])
                score = (np.maximum(iq @ lid.T, 0) * iw[:, None]).sum(axis=0)
                sel = heap_top_k(score, min(p.indexer_top_k, n_vis))
                if self.trace is not None:
                    self.trace.append(("indexer", pos, il, score, iq @ lid.T))
                keys = keys + [self.comp[il][j] for j in sorted(sel)]
        K = np.array(keys)
        if self.fa_f16:
            K, q = f16(K), f16(q)
        s = q @ K.T / math.sqrt(d)  # [H, n_keys]
        sink = w[b + "attn_sinks.weight"]
        m = np.maximum(s.max(axis=1), sink)
        e = np.exp(s - m[:, None])
        Z = e.sum(axis=1) + np.exp(sink - m)
        o = (e / Z[:, None]) @ K  # [H, d]
        o = rope_tail(o, pos, p.rope_dim, **rp, inverse=True)
        G = p.o_group_count
        o_a = w[b + "attn_output_a.weight"]
        Ro = p.o_lora_rank
        a = np.concatenate([o_a[g * Ro : (g + 1) * Ro] @ o.reshape(G, -1)[g] for g in range(G)])
        return w[b + "attn_output_b.weight"] @ a

    # ---- mixture of experts (docs/architecture.md §9)
    def moe(self, il: int, x: np.ndarray, tok: int) -> np.ndarray:
        p, w, b = self.p, self.w, f"blk.{il}."
        prob = np.sqrt(softplus(w[b + "ffn_gate_inp.weight"] @ x))
        if p.is_hash_layer(il):
            sel = w[b + "ffn_gate_tid2eid.weight"][tok]
        else:
            biased = prob + w[b + "exp_probs_b.bias"]
            sel = np.argsort(-biased, kind="stable")[: p.n_expert_used]
            if self.trace is not None:
                self.trace.append(("router", self.pos, il, biased))
        wts = prob[sel]
        if p.expert_weights_norm:
            wts = wts / max(wts.sum(), 6.103515625e-5)
        wts = wts * p.expert_weights_scale

        def ffn(gate: np.ndarray, up: np.ndarray, down: np.ndarray, lim: float) -> np.ndarray:
            g, u = gate @ x, up @ x
            if lim > 1e-6:
                g, u = np.minimum(g, lim), np.clip(u, -lim, lim)
            return down @ (g * sigmoid(g) * u)

        y = sum(
            wt
            * ffn(
                w[b + "ffn_gate_exps.weight"][e],
                w[b + "ffn_up_exps.weight"][e],
                w[b + "ffn_down_exps.weight"][e],
                p.clamp_exp(il),
            )
            for wt, e in zip(wts, sel, strict=True)
        )
        return y + ffn(
            w[b + "ffn_gate_shexp.weight"],
            w[b + "ffn_up_shexp.weight"],
            w[b + "ffn_down_shexp.weight"],
            p.clamp_shexp(il),
        )

    def step(self, tok: int) -> np.ndarray:
        p, w = self.p, self.w
        pos = self.pos
        S = np.repeat(w["token_embd.weight"][tok][None, :], p.hc_mult, axis=0)
        for il in range(p.n_layer):
            b = f"blk.{il}."
            a, post, C = self.hc_pre(S, b + "hc_attn")
            a = rms(a, p.norm_eps) * w[b + "attn_norm.weight"]
            S = self.hc_post(self.attention(il, a, pos), S, post, C)
            f, post, C = self.hc_pre(S, b + "hc_ffn")
            f = rms(f, p.norm_eps) * w[b + "ffn_norm.weight"]
            S = self.hc_post(self.moe(il, f, tok), S, post, C)
        z = rms(S.reshape(-1), p.norm_eps)
        mix = w["output_hc_fn.weight"] @ z
        pre = sigmoid(mix * w["output_hc_scale.weight"][0] + w["output_hc_base.weight"]) + p.hc_eps
        y = rms(pre @ S, p.norm_eps) * w["output_norm.weight"]
        self.pos += 1
        return w["output.weight"] @ y
