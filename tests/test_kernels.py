"""Our kernels (kernels/dsv4_ops.c) against numpy implementations of docs/architecture.md §5 and §9.4."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opgraph_build import OpGraph

from llama_dsv4 import _ggml


def np_swiglu_clamp(gate: np.ndarray, up: np.ndarray, limit: float) -> np.ndarray:
    g, u = gate.astype(np.float64), up.astype(np.float64)
    if limit > 1e-6:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    return g / (1 + np.exp(-g)) * u


def np_rope(
    x: np.ndarray,
    pos: np.ndarray,
    n_rot: int,
    *,
    base: float,
    fs: float,
    ef: float,
    af: float,
    n_orig: int,
    bf: float,
    bs: float,
    inverse: bool = False,
) -> np.ndarray:
    """RoPE (NORMAL mode, YaRN) on the last n_rot dims of each head: x [T, H, d], pos [T].

    Angles follow docs/architecture.md §5.2 step by step in float32 as ggml does (theta multiplied by theta_scale
    per pair), so the comparison is tight at any position; rotation and mixing are then done in float64.
    """
    f = np.float32
    out = x.astype(np.float64).copy()
    d = x.shape[-1]
    half = n_rot // 2
    theta_scale = f(base) ** f(-2.0 / n_rot)
    theta = np.empty((len(pos), half), np.float32)
    th = pos.astype(np.float32)
    for i in range(half):
        theta[:, i] = th
        th = (th * theta_scale).astype(np.float32)
    ang = (f(fs) * theta).astype(np.float32)
    msc = af
    if ef != 0:

        def corr(beta: float) -> float:
            return n_rot * math.log(n_orig / (beta * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(0.0, math.floor(corr(bf))), min(n_rot - 1.0, math.ceil(corr(bs)))
        ramp = (1 - np.clip((np.arange(half) - lo) / max(0.001, hi - lo), 0, 1)).astype(np.float32)
        mix = (ramp * f(ef)).astype(np.float32)
        ang = (ang * (f(1) - mix) + theta * mix).astype(np.float32)
        msc = af * (1 + 0.1 * math.log(1 / fs))
    c, s = np.cos(ang.astype(np.float64)) * msc, np.sin(ang.astype(np.float64)) * msc
    if inverse:
        s = -s
    z0, z1 = out[..., d - n_rot :: 2].copy(), out[..., d - n_rot + 1 :: 2].copy()
    out[..., d - n_rot :: 2] = z0 * c[:, None, :] - z1 * s[:, None, :]
    out[..., d - n_rot + 1 :: 2] = z0 * s[:, None, :] + z1 * c[:, None, :]
    return out


# the two per-layer parameter sets of docs/architecture.md §5.4, at the tiny model's sizes
RATIO0 = dict(base=10000.0, fs=1.0, ef=0.0, af=1.0, n_orig=0, bf=0.0, bs=0.0)
COMPRESSED = dict(base=160000.0, fs=1 / 16, ef=1.0, af=1 / (1 + 0.1 * math.log(16)), n_orig=65536, bf=32.0, bs=1.0)


def run_rope(x: np.ndarray, pos: np.ndarray, n_rot: int, prm: dict, inverse: bool = False) -> np.ndarray:
    g = OpGraph()
    h = g.input(x)
    p = g.input(pos.astype(np.int32))
    kw = dict(
        freq_base=prm["base"],
        freq_scale=prm["fs"],
        ext_factor=prm["ef"],
        attn_factor=prm["af"],
        n_ctx_orig=prm["n_orig"],
        beta_fast=prm["bf"],
        beta_slow=prm["bs"],
    )
    (out,) = g.compute([g.rope_tail(h, p, n_rot, inverse=inverse, **kw)])
    return out.reshape(x.shape)


@pytest.mark.parametrize("limit", [0.0, 1e-7, 0.5, 1.0, 10.0])
def test_swiglu_clamp_matches_numpy(limit: float) -> None:
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    up = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    g = OpGraph()
    (out,) = g.compute([g.swiglu_clamp(g.input(gate), g.input(up), limit)])
    ref = np_swiglu_clamp(gate, up, limit)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6)
    if limit == 1.0:  # the clamp really clips at unit scale, on both sides of up and above for gate
        assert (np.abs(up) > 1).mean() > 0.5 and (gate > 1).mean() > 0.2
        assert not np.allclose(ref, np_swiglu_clamp(gate, up, 0.0))


@pytest.mark.parametrize("prm", [RATIO0, COMPRESSED], ids=["ratio0", "compressed-yarn"])
@pytest.mark.parametrize(("d", "n_rot"), [(128, 32), (64, 32), (64, 64), (512, 64)])
def test_rope_tail_matches_numpy(prm: dict, d: int, n_rot: int) -> None:
    rng = np.random.default_rng(d + n_rot)
    n_tok, n_head = 9, 3
    x = rng.standard_normal((n_tok, n_head, d)).astype(np.float32)
    pos = np.array([0, 1, 2, 7, 15, 63, 255, 4095, 100000], np.int32)
    out = run_rope(x, pos, n_rot, prm)
    ref = np_rope(x, pos, n_rot, **prm)
    # untouched head dims are copied exactly
    np.testing.assert_array_equal(out[..., : d - n_rot], x[..., : d - n_rot])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_tail_yarn_covers_all_ramp_regions() -> None:
    """With nd=32, base 160000, orig 65536 the corr dims are 7 and 13: extrapolated, ramped and interpolated
    pairs all exist, so the numpy check above exercises each branch."""
    n_rot, base = 32, 160000.0
    lo = math.floor(n_rot * math.log(65536 / (32 * 2 * math.pi)) / (2 * math.log(base)))
    hi = math.ceil(n_rot * math.log(65536 / (1 * 2 * math.pi)) / (2 * math.log(base)))
    assert (lo, hi) == (7, 13)
    assert 0 < lo < hi < n_rot // 2 - 1


@pytest.mark.parametrize("prm", [RATIO0, COMPRESSED], ids=["ratio0", "compressed-yarn"])
def test_rope_tail_back_is_the_inverse(prm: dict) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 4, 128)).astype(np.float32)
    pos = np.array([0, 3, 17, 300, 4000], np.int32)
    back = run_rope(x, pos, 32, prm, inverse=True)
    np.testing.assert_allclose(back, np_rope(x, pos, 32, **prm, inverse=True), rtol=1e-5, atol=1e-5)
    # de-rope(rope(x)) == x: the rotation has unit magnitude (YaRN's mscale cancels attn_factor)
    g = OpGraph()
    h, p = g.input(x), g.input(pos)
    kw = dict(
        freq_base=prm["base"],
        freq_scale=prm["fs"],
        ext_factor=prm["ef"],
        attn_factor=prm["af"],
        n_ctx_orig=prm["n_orig"],
        beta_fast=prm["bf"],
        beta_slow=prm["bs"],
    )
    fwd = g.rope_tail(h, p, 32, **kw)
    (rt,) = g.compute([g.rope_tail(fwd, p, 32, inverse=True, **kw)])
    np.testing.assert_allclose(rt.reshape(x.shape), x, rtol=1e-5, atol=1e-5)


def test_rope_tail_rejects_bad_shapes() -> None:
    g = OpGraph()
    x = g.input(np.zeros((2, 1, 64), np.float32))
    with pytest.raises(ValueError, match="rejected"):
        g.rope_tail(x, g.input(np.zeros(2, np.int32)), 15)  # odd
    with pytest.raises(ValueError, match="rejected"):
        g.rope_tail(x, g.input(np.zeros(3, np.int32)), 16)  # wrong position count
    with pytest.raises(ValueError, match="rejected"):
        g.rope_tail(x, g.input(np.zeros(2, np.int32)), 128)  # more than the head


def test_top_k_selects_the_largest_and_breaks_ties_like_the_reference() -> None:
    from llama_dsv4.engine.topk import heap_top_k

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((40, 300)).astype(np.float32)
    rows[::3] = np.maximum(rows[::3], 0)  # relu-like rows: many exact ties at zero
    rows[1::5, 7:] = -np.inf  # masked entries, as the indexer's invisible blocks
    for k in (1, 4, 7, 64):
        g = OpGraph()
        (idx,) = g.compute([g.top_k(g.input(rows), k)])
        idx = idx.reshape(40, k)
        for r, row in enumerate(rows):
            got = set(idx[r].tolist())
            assert len(got) == k
            assert got == set(heap_top_k(row.astype(np.float64), k)), (k, r)
            # every kept value is at least as large as every dropped one
            kept = row[list(got)]
            dropped = np.delete(row, list(got))
            assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="rejected"):
        g = OpGraph()
        g.top_k(g.input(rows), 301)


@pytest.mark.parametrize(("D", "hc", "n"), [(256, 4, 1), (1024, 4, 37), (64, 3, 2)])
def test_hc_post_matches_numpy_and_ggml(D: int, hc: int, n: int) -> None:
    """kernels/dsv4_hc.c: out[t, dst, i] = x[t, i] post[t, dst] + sum_src res[t, src, i] comb[t, src, dst], on
    both threads (decode splits rows, prompt processing splits tokens)."""
    rng = np.random.default_rng([D, hc, n])
    x = rng.standard_normal((n, D)).astype(np.float32)
    res = rng.standard_normal((n, hc, D)).astype(np.float32)
    post = rng.standard_normal((n, hc)).astype(np.float32)
    comb = rng.standard_normal((n, hc, hc)).astype(np.float32)  # numpy [t, src, dst]: ggml [dst, src, t]
    g = OpGraph(_ggml.Backends("cpu", 2))
    h = [g.input(a) for a in (x, res, post, comb)]
    ours, ggml = g.compute([g.hc_post(*h), g.hc_post(*h, ours=False)])
    want = x[:, None, :] * post[:, :, None] + np.einsum("tsi,tsd->tdi", res.astype(np.float64), comb)
    assert np.abs(ours.reshape(want.shape) - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(ours - ggml).max() <= 1e-6 * np.abs(want).max()
    with pytest.raises(ValueError, match="rejected"):
        g.hc_post(h[0], h[1], h[3], h[3])  # comb where post goes


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float16])
def test_concat_matches_numpy_and_ggml(dim: int, dtype: type) -> None:
    """kernels/dsv4_concat.c copies whole rows, on both threads: the bytes of numpy's concatenation and ggml's concat,
    in every dimension and type it takes (F16 through a cast, as the attention's keys are)."""
    rng = np.random.default_rng(dim)
    shape_a, shape_b = [2, 3, 5, 7], [2, 3, 5, 7]  # numpy order: ggml dim d is numpy axis 3 - d
    shape_b[3 - dim] = 4
    a = (rng.standard_normal(shape_a) * 100).astype(np.float32)
    b = (rng.standard_normal(shape_b) * 100).astype(np.float32)
    if dtype is np.int32:
        a, b = a.astype(np.int32), b.astype(np.int32)
    g = OpGraph(_ggml.Backends("cpu", 2))
    ha, hb = g.input(a), g.input(b)
    if dtype is np.float16:
        ha, hb = g.cast(ha, 1), g.cast(hb, 1)  # GGML_TYPE_F16
        ours, ggml = g.cast(g.concat(ha, hb, dim), 0), g.cast(g.concat(ha, hb, dim, ours=False), 0)
    else:
        ours, ggml = g.concat(ha, hb, dim), g.concat(ha, hb, dim, ours=False)
    o, r = g.compute([ours, ggml])
    want = np.concatenate([a.astype(dtype).astype(np.float32), b.astype(dtype).astype(np.float32)], axis=3 - dim)
    assert o.tobytes() == r.tobytes()
    np.testing.assert_array_equal(o.reshape(want.shape), want.astype(o.dtype))


def test_concat_rope_tail_strided_and_rejections() -> None:
    """Our concat on the rope ops' strided views (each head's plain part, rows of a larger tensor) gives ggml's
    bytes; mismatched shapes or types are refused (the graph then uses ggml_concat)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    g = OpGraph(_ggml.Backends("cpu", 2))
    h, p = g.input(x), g.input(np.array([0, 7, 300], np.int32))
    outs = g.compute([g.rope_tail(h, p, 16, ours=True), g.rope_tail(h, p, 16), g.rope_tail(h, p, 16, inverse=True,
                                                                                         ours=True),
                      g.rope_tail(h, p, 16, inverse=True)])  # fmt: skip
    assert outs[0].tobytes() == outs[1].tobytes() and outs[2].tobytes() == outs[3].tobytes()
    assert not np.array_equal(outs[0], x)
    g = OpGraph()
    a, b = g.input(np.zeros((2, 3), np.float32)), g.input(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="rejected"):
        g.concat(a, b, 0)  # shapes differ outside dim 0 (numpy axis 1)
    with pytest.raises(ValueError, match="rejected"):
        g.concat(a, g.input(np.zeros((2, 3), np.int32)), 1)  # types differ


@pytest.mark.parametrize(("hc", "n", "n_gates"), [(4, 1, 2), (4, 37, 2), (3, 5, 1), (4, 2, 1)])
def test_hc_gates_equal_ggml_ops(hc: int, n: int, n_gates: int) -> None:
    """kernels/dsv4_hc.c's gates: the bytes of the ggml ops they replace (mul, add, sigmoid, + eps or x 2), on both
    threads, with the mixer's comb columns after the gates ignored; shapes that do not fit are refused."""
    rng = np.random.default_rng([hc, n])
    mix = (rng.standard_normal((n, (2 + hc) * hc)) * 4).astype(np.float32)
    scale, base = rng.standard_normal(3).astype(np.float32), rng.standard_normal((2 + hc) * hc).astype(np.float32)
    g = OpGraph(_ggml.Backends("cpu", 2))
    h = [g.input(a) for a in (mix, scale, base)]
    ours, ggml = g.compute([g.hc_gates(*h, hc, n_gates, 1e-6), g.hc_gates(*h, hc, n_gates, 1e-6, ours=False)])
    assert ours.tobytes() == ggml.tobytes()
    want = 1 / (1 + np.exp(-(mix[:, :hc] * scale[0] + base[:hc]))) + 1e-6
    np.testing.assert_allclose(ours.reshape(n_gates, n, hc)[0], want, rtol=1e-6)
    with pytest.raises(ValueError, match="rejected"):
        g.hc_gates(h[0], h[1], h[2], 17, 1, 1e-6)  # more streams than the kernel takes
