"""bench/moe_residency.py, the residency and prefetch benchmark: its policy simulator (hit rates of static, LRU and
decayed-count sets on made-up routing traces, worked out by hand), its token streams (temporal locality within a
text, different topics between texts) and one run of its child in a memory cgroup when the machine has one."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "moe_residency.py"


def load_bench() -> Any:
    sys.path.insert(0, str(SCRIPT.parent))  # it imports its neighbour bench/speed.py
    try:
        spec = importlib.util.spec_from_file_location("bench_moe_residency", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


bench = load_bench()


def test_hit_rates_of_each_policy_by_hand() -> None:
    # one layer, k = 1, experts 0..3; the other text used expert 2 only; this text alternates 0, 1, 0, 1, 3
    train = np.array([[[2], [2], [2]]])
    test = np.array([[[0], [1], [0], [1], [3]]])
    one = bench.hit_rates(train, test, 1, E=4)
    assert one["static, other text"] == 0.0  # {2}
    assert one["static, same text"] == 2 / 5  # {0}: 0 and 1 tie at 2 uses, the lower id wins
    assert one["LRU"] == 0.0  # a set of one never holds the next, different expert
    assert one["decayed count"] == 0.0  # its set {2}, learned from the other text, is updated every 64 tokens
    two = bench.hit_rates(train, test, 2, E=4)
    assert two["static, other text"] == 2 / 5  # {2, 0}: 2 first, then the lowest id of the unused
    assert two["static, same text"] == 4 / 5  # {0, 1}
    assert two["LRU"] == 2 / 5  # miss, miss, hit, hit, miss


def test_token_streams_have_topics() -> None:
    a = bench.token_stream(1, 4000, 100_000)
    assert a == bench.token_stream(1, 4000, 100_000) and len(a) == 4000 and all(3 <= t < 100_000 for t in a)
    b = bench.token_stream(2, 4000, 100_000)
    # a text draws on its own topics: at most N_TOPICS * TOPIC_TOKENS distinct tokens, few shared with another text
    assert len(set(a)) <= bench.N_TOPICS * bench.TOPIC_TOKENS
    assert len(set(a) & set(b)) < len(set(a)) / 2
    # locality: a window of 16 tokens repeats about 3.5 of them (16 draws from a topic of 32; draws from all of the
    # text's 2048 tokens would repeat 0.06)
    repeats = np.mean([16 - len(set(a[i : i + 16])) for i in range(0, 3984, 16)])
    assert repeats > 2


def test_child_runs_in_a_memory_cgroup(tmp_path: Any, micro_path: str) -> None:
    why = bench.cgroup_available()
    if why:
        pytest.skip(why)
    cfg = {"threads": 1, "learn": [5, 6, 7, 8], "decode": [9, 10, 11], "kw": {"moe_prefetch": True}}
    size = os.path.getsize(micro_path)
    r = bench.run("ours", sys.executable, micro_path, cfg, size + (512 << 20), None)  # the interpreter needs room too
    assert "error" not in r and r["tps"] > 0 and r["majflt"] >= 0, r
