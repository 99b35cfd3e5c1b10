"""MoE expert residency (docs/moe-residency.md, "What the tests check"): exact counting, the auto rule and the
budget, the statistics file (round trip, rejection, atomicity, merge, EST1), residency seen by the kernel, back-off,
and logits that never change."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import MICRO

from llama_dsv4 import Llama
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model
from llama_dsv4.moe import ExpertResidency, MoEConfig, parse_hot_count, parse_prefetch, policy, statsfile
from llama_dsv4.moe.counts import ExpertCounts
from llama_dsv4.moe.memory import PAGE, Syscalls, subtract, union

MOE = dataclasses.replace(MICRO, n_expert=16, n_expert_used=4, expert_ff=256)
PROMPT = [int(x) for x in np.random.default_rng(7).integers(3, 500, 150)]


@pytest.fixture(scope="module")
def moe_path(model_dir: str) -> str:
    path = write_model(os.path.join(model_dir, "moe16.gguf"), MOE, dtype="f32", name="Deep Seek/V4*")[0]
    fd = os.open(path, os.O_RDONLY)  # as a model on a user's disk: written back and not in the page cache
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return path


@pytest.fixture()
def home(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HOME", str(tmp_path))
    return str(tmp_path)


def llama(path: str, **kw: Any) -> Llama:
    return Llama(
        model_path=path, n_ctx=512, n_batch=64, n_ubatch=64, verbose=False, n_threads=1, n_threads_batch=1, **kw
    )


class FakeSys(Syscalls):
    """Syscalls that lock nothing for real and fail once `quota` bytes are locked."""

    def __init__(self, quota: int | None = None) -> None:
        self.quota, self.held, self.calls = quota, 0, []

    def mlock(self, addr: int, n: int) -> int:
        self.calls.append(("mlock", addr, n))
        if self.quota is not None and self.held + n > self.quota:
            return 12  # ENOMEM
        self.held += n
        return 0

    def munlock(self, addr: int, n: int) -> int:
        self.calls.append(("munlock", addr, n))
        self.held -= n
        return 0

    def release(self, addr: int, n: int, fd: int = -1, offset: int = 0) -> int:
        self.calls.append(("release", addr, n))
        return 0

    def resident(self, addr: int, n: int) -> int:
        return n


# ---------------------------------------------------------------------------------------------- parameters


def test_hot_count_parsing() -> None:
    assert parse_hot_count(None) is None and parse_hot_count(0) is None and parse_hot_count("off") is None
    assert parse_hot_count(64) == 64 and parse_hot_count("64") == 64
    assert parse_hot_count("auto") == "auto" and parse_hot_count("AUTO") == "auto"
    assert parse_hot_count("4,8,16") == [4, 8, 16] and parse_hot_count([4, 8]) == [4, 8]
    for bad in (-1, "x", "4,y", [], [1, -2], 2.5, True, [True]):
        with pytest.raises(ValueError, match="moe_hot_count"):
            parse_hot_count(bad)
    with pytest.raises(ValueError, match="moe_hot_budget_mib"):
        MoEConfig(4, budget_mib=-1)


def test_bad_knobs_fail_before_loading(moe_path: str) -> None:
    with pytest.raises(ValueError, match="moe_hot_count"):
        llama(moe_path, moe_hot_count="most")
    # residency releases pages of the mapping back to the file: weights read into memory have no file behind them
    with pytest.raises(ValueError, match=r"moe_hot_count .* needs use_mmap=True"):
        llama(moe_path, moe_hot_count=2, use_mmap=False)


# ---------------------------------------------------------------------------------------------- counting


def test_counting_is_exact_in_prefill_and_decode(moe_path: str, home: str) -> None:
    seen: list[np.ndarray] = []
    llm = llama(moe_path, moe_hot_count=4)
    sink = llm._ctx.route_sink
    llm._ctx.route_sink = lambda r, t: (seen.append(r.copy()), sink(r, t))
    llm.eval(PROMPT)  # prefill in ubatches of 64
    st = llm.moe_stats()
    L, k = MOE.n_layer, MOE.n_expert_used
    life = llm._moe.counts.lifetime
    assert (life.sum(axis=1) == k * len(PROMPT)).all()  # every layer: k per prompt token, not a strided view
    for _ in range(5):
        llm.eval([int(np.argmax(llm.sequence.last_logits))])
    assert (llm._moe.counts.lifetime.sum(axis=1) == k * (len(PROMPT) + 5)).all()
    routes = np.concatenate(seen, axis=1)  # [L, tokens, k]
    assert routes.shape == (L, len(PROMPT) + 5, k)
    assert all(len(set(row)) == k for row in routes.reshape(-1, k))  # k distinct experts per token and layer
    assert st["routed"] == L * k * len(PROMPT) and llm._moe.counts.bad_routes == 0
    # hash layers: the histogram of the tokens' tid2eid rows, exactly
    model = load_model(moe_path)
    toks = np.array(PROMPT)
    for layer in range(MOE.hash_layer_count):
        tid = model.array(f"blk.{layer}.ffn_gate_tid2eid.weight")
        want = np.bincount(tid[toks].ravel(), minlength=MOE.n_expert)
        assert np.array_equal(np.bincount(routes[layer, : len(PROMPT)].ravel(), minlength=MOE.n_expert), want)
    model.close()
    llm.close()


def test_hit_rate_is_measured_against_the_hot_set_in_force() -> None:
    c = ExpertCounts(2, 8, 2)
    hot = np.zeros((2, 8), bool)
    hot[:, :2] = True
    c.add(np.array([[[0, 1], [0, 5]], [[6, 7], [1, 2]]]), hot)
    assert c.hits.tolist() == [3, 1] and c.routed.tolist() == [4, 4] and c.hit_rate() == 0.5
    c.add(np.array([[[0, 9]], [[1, 2]]]), hot)  # an out-of-range id is not counted, and is recorded
    assert c.bad_routes == 1 and c.lifetime.sum() == 4 + 4 + 1 + 2


def test_decay_halves_every_half_life() -> None:
    c = ExpertCounts(1, 4, 1, half_life=10)
    c.add(np.zeros((1, 10, 1), np.int64))
    assert c.decayed[0, 0] == pytest.approx(10)
    c.add(np.ones((1, 10, 1), np.int64))
    assert c.decayed[0, 0] == pytest.approx(5) and c.decayed[0, 1] == pytest.approx(10)
    assert c.lifetime[0].tolist() == [10, 10, 0, 0]


# ---------------------------------------------------------------------------------------------- selection


def test_auto_rule_on_synthetic_counts() -> None:
    score = np.zeros((4, 16))
    score[0, :10] = 10.0  # flat over 10 experts: 99% needs all 10
    score[1, 0] = 1000.0  # one expert: the floor decides
    score[1, 1:3] = 1.0
    score[2] = np.arange(16, 0, -1, dtype=float)  # 99% of 136 = 134.64 -> all but the last one (1)
    prev = np.array([7, 7, 7, 7])
    m = policy.auto_counts(score, prev, 0.99, floor=4)
    assert m.tolist() == [10, 4, 15, 7]  # layer 3 has no data: keeps its previous count
    assert policy.auto_counts(score, prev, 0.5, floor=1)[2] == 5  # 16+15+14+13+12 = 70 >= 68


def test_ranking_is_deterministic_with_ties_by_id() -> None:
    score = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    life = np.array([[5, 1, 1, 0, 2]], np.uint64)
    assert policy.ranking(score, life)[0].tolist() == [4, 1, 2, 0, 3]  # score, then lifetime, then id
    assert policy.ranking(np.zeros((1, 4)), np.zeros((1, 4), np.uint64))[0].tolist() == [0, 1, 2, 3]


def test_budget_bound_floor_prefix_and_order() -> None:
    rng = np.random.default_rng(3)
    for trial in range(50):
        L, E = 5, 32
        score = rng.pareto(1.0, (L, E)) * rng.integers(1, 100, (L, 1))
        hot = rng.integers(0, E + 1, L)
        b = rng.integers(1, 5, L) * 1000
        budget = int(rng.integers(0, int((hot * b).sum()) + 2000))
        out, warning = policy.trim_to_budget(score, hot, b, budget, floor=4)
        desired = int((hot * b).sum())
        if desired <= budget:
            assert out.tolist() == hot.tolist() and warning is None
            continue
        assert int((out * b).sum()) <= budget and (out <= hot).all()
        floor = np.minimum(4, hot)
        if int((floor * b).sum()) <= budget:
            assert (out >= floor).all() and warning is None
        else:
            assert warning is not None
        # greedy by score per byte: nothing left out beats something taken, unless it no longer fit
        srt = -np.sort(-score, axis=1)
        lo = floor if warning is None else np.zeros_like(floor)
        taken = [srt[li, r] / b[li] for li in range(L) for r in range(int(lo[li]), out[li])]
        left = budget - int((out * b).sum())
        for li in range(L):
            if out[li] < hot[li] and b[li] <= left:
                pytest.fail(f"trial {trial}: layer {li} could still take an expert")
        assert all(np.isfinite(taken))


def test_interval_operations() -> None:
    a = union(np.array([5, 0, 3, 20]), np.array([8, 2, 6, 22]))
    assert a[0].tolist() == [0, 3, 20] and a[1].tolist() == [2, 8, 22]
    d = subtract(a, union(np.array([1, 4]), np.array([4, 21])))
    assert list(zip(d[0].tolist(), d[1].tolist(), strict=True)) == [(0, 1), (21, 22)]


# ---------------------------------------------------------------------------------------------- residency


def test_locked_bytes_are_the_kernels_and_follow_the_hot_set(moe_path: str, home: str) -> None:
    llm = llama(moe_path, moe_hot_count=3)
    st = llm.moe_stats()
    bpe = llm._moe.bytes_per_expert
    assert st["hot_per_layer"] == [3] * MOE.n_layer and st["hot_bytes"] == int((3 * bpe).sum())
    slack = 2 * 3 * MOE.n_layer * PAGE  # page rounding: at most a page at each end of each tensor's hot slices
    assert st["hot_bytes"] <= st["locked_bytes"] <= st["hot_bytes"] + slack
    if st["kernel_locked_bytes"] is not None:  # Linux: VmLck is the kernel's own count
        assert st["kernel_locked_bytes"] == st["locked_bytes"]
    llm.close()
    if Syscalls.locked_bytes() is not None:
        assert Syscalls.locked_bytes() == 0  # close() unlocks


def test_use_mlock_locks_weights_read_into_memory(moe_path: str) -> None:
    """use_mmap=False with use_mlock: the memory the weights were read into is locked (as llama.cpp's --no-mmap
    --mlock), every byte of it."""
    llm = llama(moe_path, use_mmap=False, use_mlock=True)
    n_bytes = llm._model.n_bytes
    locked = llm._runner.mlock
    assert locked is not None and n_bytes <= locked.locked_bytes <= n_bytes + 2 * len(llm._model.tensors) * PAGE
    if Syscalls.locked_bytes() is not None:
        assert Syscalls.locked_bytes() == llm._runner.mlock.locked_bytes
    llm.close()
    if Syscalls.locked_bytes() is not None:
        assert Syscalls.locked_bytes() == 0


def test_back_off_on_lock_failure_warns_and_caps_the_budget(moe_path: str, home: str) -> None:
    model = load_model(moe_path)
    wm = model.weights()
    fake = FakeSys(quota=5 * 2**20)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = ExpertResidency(
            model, wm.host_range, MoEConfig("auto", stats_path=os.path.join(home, "s.bin")), syscalls=fake
        )
    assert any("locking failed" in str(x.message) for x in w)
    assert r.backoff is not None and r.backoff <= 0.95 * 5 * 2**20 + PAGE
    assert r.memory.locked_bytes <= 5 * 2**20 and r.memory.lock_failed_bytes == 0  # settled under the cap
    cap = r.backoff
    r.on_routes(np.zeros((MOE.n_layer, 2000, MOE.n_expert_used), np.int32) + np.arange(4))
    assert r.backoff <= cap  # never grows back
    r.memory.unlock_all()
    model.close()


def test_real_back_off_without_lock_privilege(moe_path: str, home: str) -> None:
    """With CAP_IPC_LOCK dropped and RLIMIT_MEMLOCK at 1 MiB, the kernel refuses; we warn and carry on."""
    if not sys.platform.startswith("linux") or not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs Linux and setpriv to drop the lock privilege")
    code = (
        "import resource, warnings, sys; resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20));"
        "from llama_dsv4 import Llama;"
        "warnings.simplefilter('always');"
        f"li = Llama(model_path={moe_path!r}, n_ctx=64, verbose=False, moe_hot_count='auto');"
        "s = li.moe_stats(); li.eval([1, 2, 3]);"
        "print(s['locked_bytes'], s['kernel_locked_bytes'], s['budget_effective_bytes'])"
    )
    r = subprocess.run(
        ["/usr/bin/setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": home},
    )
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "locking failed" in r.stderr
    locked, kernel, budget = (int(x) for x in r.stdout.split())
    assert locked <= 1 << 20 and kernel == locked and 0 < budget <= 0.95 * (1 << 20) + PAGE


# ---------------------------------------------------------------------------------------------- logits


def greedy_scores(path: str, evict: bool = False, **kw: object) -> np.ndarray:
    """The logits of every position of PROMPT (prefill in ubatches of 64) and 12 greedy steps after it; with evict,
    the model's pages leave the page cache first."""
    if evict:
        _evict(path)
    llm = llama(path, logits_all=True, **kw)
    llm.eval(PROMPT)
    for _ in range(12):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    out = llm.scores[: llm.n_tokens].copy()
    llm.close()
    return out


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def test_logits_bit_identical_with_the_feature_off_uniform_and_auto_budget(moe_path: str, home: str) -> None:
    off = greedy_scores(moe_path)
    for kw in ({"moe_hot_count": 4}, {"moe_hot_count": "auto", "moe_hot_budget_mib": 3}, {"moe_hot_count": [16]}):
        assert np.array_equal(greedy_scores(moe_path, **kw), off), kw


# ---------------------------------------------------------------------------------------------- prefetch


def test_prefetch_changes_no_result(moe_path: str, home: str) -> None:
    off = greedy_scores(moe_path, evict=True, moe_prefetch=False)  # pages missing: prefetch nodes issue their reads
    for kw in ({"moe_prefetch": True}, {"moe_prefetch": True, "moe_hot_count": "auto", "moe_hot_budget_mib": 8}):
        assert np.array_equal(greedy_scores(moe_path, evict=True, **kw), off), kw


def test_prefetch_checks_each_chosen_expert_and_asks_for_missing_pages(moe_path: str) -> None:
    llm = llama(moe_path, moe_prefetch=True)
    assert llm.moe_stats() == {
        "prefetch_calls": 0, "prefetch_slices": 0, "prefetch_missing_slices": 0, "prefetch_missing_bytes": 0,
    }  # fmt: skip
    L, k = MOE.n_layer, MOE.n_expert_used
    model = load_model(moe_path)
    expert_bytes = sum(t.nbytes for n, t in model.tensors.items() if n.endswith("_exps.weight"))
    model.close()
    _evict(moe_path)
    seen: list[np.ndarray] = []
    llm._ctx.route_sink = lambda r, t=None: seen.append(r.copy())
    llm.eval([PROMPT[0]])  # one token: every layer checks its k experts' gate, up and down slices
    st = llm.moe_stats()
    assert st["prefetch_calls"] == L and st["prefetch_slices"] == 3 * k * L
    assert 0 < st["prefetch_missing_bytes"] <= expert_bytes + 3 * k * L * PAGE and st["prefetch_missing_slices"] > 0
    llm.eval(PROMPT[1:65])  # a ubatch of 64 tokens: each distinct expert of a layer checked once
    routes = np.concatenate(seen, axis=1)[:, 1:]
    distinct = sum(len(np.unique(routes[il])) for il in range(L))
    st2 = llm.moe_stats()
    assert st2["prefetch_calls"] == 2 * L and st2["prefetch_slices"] == st["prefetch_slices"] + 3 * distinct
    missing = st2["prefetch_missing_bytes"]
    llm.reset()
    llm.eval(PROMPT[1:65])  # the same experts again: in memory now, nothing asked for
    st3 = llm.moe_stats()
    assert st3["prefetch_slices"] == st2["prefetch_slices"] + 3 * distinct and st3["prefetch_missing_bytes"] == missing
    llm.close()


def test_prefetch_setting_and_its_auto_rule(moe_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [parse_prefetch(v) for v in (True, "on", False, None, "off", "auto", " AUTO ")] == [
        True, True, False, False, False, "auto", "auto",
    ]  # fmt: skip
    for bad in ("sometimes", 2, [True]):
        with pytest.raises(ValueError, match="moe_prefetch"):
            parse_prefetch(bad)
    with pytest.raises(ValueError, match=r"moe_prefetch .* needs use_mmap=True"):
        llama(moe_path, moe_prefetch=True, use_mmap=False)
    # auto (the default): on where the model is larger than 90 % of the memory the process may hold
    from llama_dsv4.engine import runtime

    size = load_model(moe_path)
    n_bytes = size.n_bytes
    size.close()
    assert runtime.memory_short_of(n_bytes) is False  # this machine holds the test model
    for total, want in ((n_bytes, True), (int(n_bytes / 0.91), True), (int(n_bytes / 0.89), False), (None, False)):
        monkeypatch.setattr(runtime, "host_memory_total", lambda total=total: total)
        assert runtime.memory_short_of(n_bytes) is want, total
        llm = llama(moe_path)
        assert llm._ctx.moe_prefetch is want and (llm.moe_stats() is not None) is want
        llm.close()
        llm = llama(moe_path, moe_prefetch=False)
        assert llm._ctx.moe_prefetch is False
        llm.close()
    monkeypatch.setattr(runtime, "host_memory_total", lambda: n_bytes)
    llm = llama(moe_path, use_mmap=False)  # auto with the weights read into memory: nothing to prefetch
    assert llm._ctx.moe_prefetch is False
    llm.close()


# ---------------------------------------------------------------------------------------------- the file


def test_file_round_trip_and_auto_counts_carry_over(moe_path: str, home: str) -> None:
    llm = llama(moe_path, moe_hot_count="auto")
    llm._moe.config.interval = 64
    llm.eval(PROMPT)
    life, dec = llm._moe.counts.lifetime.copy(), llm._moe.counts.decayed.copy()
    hot_end = policy.auto_counts(dec, llm._moe.requested, 0.99, MOE.n_expert_used)
    path = llm._moe.path
    llm.close()
    assert os.path.basename(path) == "expert_Deep_Seek_V4_.dsv4.bin"  # general.name sanitised
    llm2 = llama(moe_path, moe_hot_count="auto")
    assert np.array_equal(llm2._moe.counts.lifetime, life)
    assert np.array_equal(llm2._moe.counts.decayed, dec)
    assert llm2.moe_stats()["hot_per_layer"] == hot_end.tolist()
    assert llm2.moe_stats()["loaded_from"] == path
    llm2.close()


def _stats_file(path: str, home: str) -> tuple[str, bytes]:
    llm = llama(path, moe_hot_count=4)
    llm.eval(PROMPT[:40])
    p = llm._moe.path
    llm.close()
    with open(p, "rb") as f:
        return p, f.read()


@pytest.mark.parametrize(
    "damage", ["flip", "truncate", "pad", "magic", "newer", "version0", "shape", "fingerprint", "nan"]
)
def test_corrupt_file_is_ignored_without_touching_live_state(moe_path: str, home: str, damage: str) -> None:
    p, good = _stats_file(moe_path, home)
    b = bytearray(good)
    head = statsfile._HEAD.size
    if damage == "flip":
        b[head + 17] ^= 0x10
    elif damage == "truncate":
        b = b[: len(b) // 2]
    elif damage == "pad":
        b += b"\0" * 8
    elif damage == "magic":
        b[0:8] = b"NOTMOE\0\0"
    elif damage == "newer":
        b[8:12] = struct.pack("<I", 99)
    elif damage == "version0":
        b[8:12] = struct.pack("<I", 0)
    elif damage == "shape":
        b[16:20] = struct.pack("<I", 17)
    elif damage == "fingerprint":
        b[24] ^= 1
    elif damage == "nan":
        off = head + 8 * MOE.n_layer * MOE.n_expert
        b[off : off + 8] = struct.pack("<d", float("nan"))
    if damage in ("shape", "fingerprint", "nan", "newer", "version0"):  # a valid checksum: only the content is wrong
        b[-32:] = statsfile.hashlib.sha256(bytes(b[:-32])).digest()
    with open(p, "wb") as f:
        f.write(bytes(b))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm = llama(moe_path, moe_hot_count=4)
    assert any("ignoring MoE statistics" in str(x.message) for x in w), [str(x.message) for x in w]
    assert llm._moe.counts.lifetime.sum() == 0 and llm._moe.counts.tokens == 0  # nothing partial
    llm.eval(PROMPT[:10])
    llm.close()  # the next save replaces a damaged file of ours with a valid one ...
    data = statsfile.read_bytes(p)
    if damage in ("fingerprint", "magic", "newer"):  # ... never another model's, another program's or a newer one
        assert data == bytes(b)
        return
    s = statsfile.decode(data, MOE.n_layer, MOE.n_expert, MOE.n_expert_used, llm_fp(moe_path))
    assert s.tokens == 10


def llm_fp(path: str) -> bytes:
    m = load_model(path)
    try:
        return statsfile.fingerprint(m)
    finally:
        m.close()


def test_processes_sharing_a_file_merge(moe_path: str, home: str) -> None:
    a = llama(moe_path, moe_hot_count=4)
    b = llama(moe_path, moe_hot_count=4)
    path = a._moe.path
    a.eval(PROMPT[:50])
    b.eval(PROMPT[50:120])
    la, lb = a._moe.counts.lifetime.copy(), b._moe.counts.lifetime.copy()
    a.moe_save_stats()
    b.moe_save_stats()
    a.eval(PROMPT[:10])
    a.close()
    b.close()
    s = statsfile.decode(
        statsfile.read_bytes(path),
        MOE.n_layer,
        MOE.n_expert,
        MOE.n_expert_used,
        llm_fp(moe_path),
    )
    k = MOE.n_expert_used
    assert s.tokens == 50 + 70 + 10
    assert np.array_equal(s.lifetime.sum(axis=1), np.full(MOE.n_layer, k * 130))
    assert (s.lifetime >= la).all() and (s.lifetime >= lb).all()


def test_est1_files_are_imported(moe_path: str, home: str) -> None:
    L, E = MOE.n_layer, MOE.n_expert
    counts = np.random.default_rng(1).integers(0, 1000, (L, E)).astype("<u8")
    os.makedirs(os.path.join(home, ".llama"))
    est1 = os.path.join(home, ".llama", "expert_Deep_Seek_V4_.bin")
    with open(est1, "wb") as f:
        f.write(struct.pack("<III", 0x31545345, L, E) + counts.tobytes())
    llm = llama(moe_path, moe_hot_count="auto")
    assert np.array_equal(llm._moe.counts.lifetime, counts) and llm.moe_stats()["loaded_from"] == est1
    order = policy.ranking(counts.astype(float), counts)
    assert all(np.array_equal(llm._moe.hot_sets[li], order[li, : llm._moe.hot[li]]) for li in range(L))
    llm.close()
    with open(est1, "rb") as f:
        assert f.read(4) == b"EST1"  # the seed's file is left as it was; ours is written beside it
    with open(est1, "wb") as f:  # a wrong-shape EST1 is refused with a warning
        f.write(struct.pack("<III", 0x31545345, L + 1, E) + counts.tobytes())
    os.unlink(os.path.join(home, ".llama", "expert_Deep_Seek_V4_.dsv4.bin"))
    with pytest.warns(RuntimeWarning, match="EST1"):
        llama(moe_path, moe_hot_count=4).close()


SAVER = """
import sys, numpy as np
from llama_dsv4.model.loader import load_model
from llama_dsv4.moe import ExpertResidency, MoEConfig
m = load_model(sys.argv[1])
r = ExpertResidency(m, m.weights().host_range, MoEConfig(4, stats_path=sys.argv[2], release_cold=False))
rng = np.random.default_rng(int(sys.argv[3]))
print("ready", flush=True)
while True:
    r.on_routes(rng.integers(0, m.params.n_expert, (m.params.n_layer, 64, m.params.n_expert_used)))
    r.save()
"""


def test_a_kill_during_save_never_leaves_a_partial_file(moe_path: str, home: str) -> None:
    path = os.path.join(home, "stats.bin")
    fp = llm_fp(moe_path)
    rng = np.random.default_rng(0)
    valid = 0
    for i in range(12):
        p = subprocess.Popen([sys.executable, "-c", SAVER, moe_path, path, str(i)], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        data = statsfile.read_bytes(path)
        if data is not None:
            statsfile.decode(data, MOE.n_layer, MOE.n_expert, MOE.n_expert_used, fp)  # raises if partial
            valid += 1
    assert valid >= 10  # the file existed (and was whole) after nearly every kill
    leftovers = [f for f in os.listdir(home) if f.endswith(".tmp")]
    assert len(leftovers) <= 1  # each save removes what killed writers left; only the last kill's may remain


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A call that blocks (opening a FIFO) fails the test instead of hanging it."""

    def fail(*_: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "devnull", "symlink", "directory", "socket", "lock-fifo", "lock-devnull"])
def test_only_a_file_of_ours_is_ever_replaced(moe_path: str, home: str, kind: str) -> None:
    """A FIFO, a device (here through a symbolic link to /dev/null: as root, /dev/null itself used to be replaced by
    a regular file), a link to another file, a directory or a socket at the statistics path, or at its lock file, is
    left as it is: a warning, no block, no statistics saved there."""
    path = os.path.join(home, "stats.bin")
    elsewhere = os.path.join(home, "elsewhere.bin")
    with open(elsewhere, "wb") as f:
        f.write(b"someone else's data")
    sock = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devnull":
        os.symlink(os.devnull, path)
    elif kind == "symlink":
        os.symlink(elsewhere, path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
    elif kind == "lock-fifo":
        os.mkfifo(path + ".lock")
    else:
        os.symlink(os.devnull, path + ".lock")
    watched = path + ".lock" if kind.startswith("lock") else path
    before = os.lstat(watched)
    try:
        with deadline(60), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            llm = llama(moe_path, moe_hot_count=4, moe_stats_path=path)
            llm.eval(PROMPT[:20])
            assert llm.moe_save_stats() is False
            llm.close()
    finally:
        if sock is not None:
            sock.close()
    after = os.lstat(watched)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert any("left as it is" in str(x.message) or "lock file" in str(x.message) for x in w), [
        str(x.message) for x in w
    ]
    with open(elsewhere, "rb") as f:
        assert f.read() == b"someone else's data"
    assert not [f for f in os.listdir(home) if f.endswith(".tmp")]
    if kind.startswith("lock"):
        assert not os.path.exists(path)


def _write_stats(moe_path: str, path: str, lifetime: np.ndarray, tokens: int) -> None:
    s = statsfile.Stats(
        MOE.n_layer, MOE.n_expert, MOE.n_expert_used, llm_fp(moe_path), tokens, 16384.0, lifetime, lifetime * 1.0
    )
    with open(path, "wb") as f:
        f.write(statsfile.encode(s))


def test_counts_saturate_instead_of_wrapping(moe_path: str, home: str) -> None:
    """Counts and tokens near 2**64 (a long life, or a crafted file) stop at the largest u64 instead of wrapping
    back to small numbers, in memory and in the merged file; saves inside eval() and close() never raise."""
    top = (1 << 64) - 1
    c = ExpertCounts(2, 4, 2)
    c.load(np.full((2, 4), top - 1, np.uint64), np.zeros((2, 4)), top - 3)
    c.hits[:] = c.routed[:] = top - 1
    c.add(np.array([[[0, 1]] * 5, [[2, 3]] * 5]), np.ones((2, 4), bool))
    assert c.lifetime.min() == top - 1 and c.lifetime.max() == top and c.tokens == top
    assert (c.hits == top).all() and (c.routed == top).all() and c.hit_rate() == 1.0

    path = os.path.join(home, "stats.bin")
    life = np.full((MOE.n_layer, MOE.n_expert), top - 2, np.uint64)
    life[0, 0] = 5
    _write_stats(moe_path, path, life, top - 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning: these are valid statistics
        llm = llama(moe_path, moe_hot_count=4, moe_stats_path=path)
        llm._moe.config.interval, llm._moe.config.save_every = 16, 1  # saves inside eval()
        llm.eval(PROMPT[:100])
        assert llm.moe_stats()["tokens_counted"] == top
        llm.close()
    s = statsfile.decode(statsfile.read_bytes(path), MOE.n_layer, MOE.n_expert, MOE.n_expert_used, llm_fp(moe_path))
    assert s.tokens == top and (s.lifetime >= life).all() and s.lifetime.max() == top


def test_a_failing_save_is_a_warning_and_close_still_releases(
    moe_path: str, home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = llama(moe_path, moe_hot_count=4)
    llm._moe.config.interval, llm._moe.config.save_every = 16, 1
    moe = llm._moe

    def broken(_: object) -> bytes:
        raise struct.error("argument out of range")

    monkeypatch.setattr(statsfile, "encode", broken)
    with pytest.warns(RuntimeWarning, match="could not save MoE statistics.*out of range"):
        llm.eval(PROMPT[:40])  # saves inside eval(): a warning, the evaluation goes on
    assert llm.n_tokens == 40
    llm.close()  # its save fails the same way (warned once): the context, pages and files are released all the same
    assert llm._ctx is None and moe._fds == [] and moe.memory.locked_bytes == 0
    with pytest.raises(ValueError, match="closed"):
        llm.eval([1])


def test_stale_temporaries_are_removed(moe_path: str, home: str) -> None:
    path = os.path.join(home, "stats.bin")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is gone
    names = {
        f".stats.bin.{p.pid}-abcdefgh.tmp": False,  # its writer is gone
        f".stats.bin.{os.getpid()}-abcdefgh.tmp": True,  # a live writer's, fresh
        f".stats.bin.{os.getpid()}-oldoldol.tmp": False,  # ... but an hour old: a reused pid
        ".expert-abcdefgh.tmp": False,  # earlier versions' naming, an hour old
        ".expert-freshfre.tmp": True,  # ... fresh: perhaps a live writer of another file
        ".other.bin.1-abcdefgh.tmp": True,  # another file's
        "stats.bin.tmp": True,  # not our naming
    }
    old = time.time() - 3600
    for name in names:
        with open(os.path.join(home, name), "wb") as f:
            f.write(b"x")
        if "old" in name or name == ".expert-abcdefgh.tmp":
            os.utime(os.path.join(home, name), (old, old))
    os.symlink(os.devnull, os.path.join(home, f".stats.bin.{p.pid}-linklink.tmp"))  # not a regular file: kept
    llm = llama(moe_path, moe_hot_count=4, moe_stats_path=path)
    llm.eval(PROMPT[:10])
    assert llm.moe_save_stats()
    llm.close()
    left = set(os.listdir(home))
    assert {n for n, keep in names.items() if keep} | {f".stats.bin.{p.pid}-linklink.tmp"} <= left
    assert not {n for n, keep in names.items() if not keep} & left


def test_updates_follow_the_token_cadence(moe_path: str, home: str) -> None:
    llm = llama(moe_path, moe_hot_count="auto")
    m = llm._moe
    m.config.interval = 100
    llm.eval(PROMPT[:64])
    assert m.updates == 0
    llm.eval(PROMPT[64:128])  # 128 counted tokens: one update, prefill included
    assert m.updates == 1 and m.stats()["reclassify_seconds_total"] > 0
    llm.close()


def test_dropping_cold_experts_lowers_their_resident_bytes(moe_path: str, home: str) -> None:
    llm = llama(moe_path, moe_hot_count=2, moe_release_cold=True)
    st = llm.moe_stats()
    slack = 2 * 3 * MOE.n_layer * PAGE
    if st["resident_bytes"] < 0:
        pytest.skip("mincore is not available here")
    # only the hot experts' pages (locked) stay in memory; the cold ones were dropped from the page cache
    assert st["resident_bytes"] <= st["locked_bytes"] + slack < st["expert_bytes"] // 2
    llm.eval(PROMPT[:64])  # routing to cold experts brings their pages back: residency, not correctness
    assert llm.moe_stats()["resident_bytes"] > st["resident_bytes"]
    llm.close()


def test_resident_bytes_reads_pages_a_chunk_at_a_time() -> None:
    """mincore over a bounded vector (the real model's 45M pages would be a 45 MB vector per /metrics scrape):
    the count is the same for any chunk size."""
    import mmap

    if not sys.platform.startswith("linux"):
        pytest.skip("anonymous-page residency is checked on Linux")
    m = mmap.mmap(-1, 40 * PAGE)
    for p in range(0, 40, 3):  # touch 14 pages
        m[p * PAGE] = 1
    addr = np.frombuffer(m, np.uint8).ctypes.data
    s = Syscalls()
    whole = s.resident(addr, 40 * PAGE)
    s.RESIDENT_CHUNK = 3
    chunked = s.resident(addr, 40 * PAGE)
    assert whole == chunked == 14 * PAGE
    del addr
