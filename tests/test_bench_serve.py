"""bench/serve.py, the serving benchmark: its SSE parsing, its aggregation and table (on made-up streams, with the
numbers worked out by hand), and its --quick mode run against our server (the micro model with the real
vocabulary, 1 and 2 streams). The side-by-side part needs llama-server (tools/oracle/build_server.sh): that test
runs when $DSV4_LLAMA_SERVER names the binary."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


bench = load_bench()


def clock(*times: float) -> Any:
    it = iter(times)
    return lambda: next(it)


def test_sse_events_skip_comments_and_stop_at_done() -> None:
    lines = [
        b": ping\n",
        b"\n",
        b'data: {"choices": [{"text": "a", "finish_reason": null}]}\r\n',
        b"event: message\n",
        b'data:{"choices": [{"text": "b", "finish_reason": "length"}]}\n',
        b"data: [DONE]\n",
        b'data: {"after": "done"}\n',
    ]
    assert list(bench.sse_events(lines)) == [
        {"choices": [{"text": "a", "finish_reason": None}]},
        {"choices": [{"text": "b", "finish_reason": "length"}]},
        None,
    ]


def test_record_times_the_chunks_and_takes_the_usage_count() -> None:
    events = [
        {"choices": [{"text": "a", "finish_reason": None}]},
        {"choices": [{"text": "", "finish_reason": None}]},  # a held-back partial character still counts as a chunk
        {"choices": [{"text": "c", "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 64, "completion_tokens": 4}},
        None,
    ]
    s = bench.record(10.0, events, clock(10.5, 10.6, 10.8))
    assert s.sent == 10.0 and s.chunks == [10.5, 10.6, 10.8]
    assert s.tokens == 4 and s.prompt_tokens == 64 and s.finish_reason == "length"
    # without a usage chunk: one token per chunk
    s = bench.record(0.0, [*events[:2], None], clock(1.0, 2.0))
    assert s.tokens == 2 and s.prompt_tokens == 0
    with pytest.raises(RuntimeError, match="error in the stream"):
        bench.record(0.0, [{"error": {"message": "boom"}}], clock())


def test_aggregate_counts_tokens_after_the_first_over_the_decode_phase() -> None:
    a = bench.Stream(0.0, [1.0, 2.0, 3.0, 4.0], tokens=4, prompt_tokens=60)
    b = bench.Stream(0.5, [2.5, 3.0, 4.0, 5.0], tokens=5, prompt_tokens=64)  # 5 tokens in 4 chunks
    m = bench.aggregate([a, b], want=5)
    # (4 - 1) + (5 - 1) tokens over 1.0 .. 5.0
    assert m["agg"] == pytest.approx(7 / 4.0)
    assert m["ttft_med"] == pytest.approx(1.5) and m["ttft_max"] == pytest.approx(2.0)
    assert m["short"] == 1 and m["prompt"] == 62
    with pytest.raises(RuntimeError, match="1 of 2 streams returned no token"):
        bench.aggregate([a, bench.Stream(0.0)], want=4)


def test_table_medians_and_ratios() -> None:
    def m(agg: float, ttft: float) -> dict[str, float]:
        return {"agg": agg, "ttft_med": ttft, "ttft_max": 2 * ttft, "short": 0.0, "prompt": 64.0}

    res = {
        "ours": {1: [m(10, 0.1), m(12, 0.3), m(11, 0.2)], 4: [m(30, 0.4), m(33, 0.4), m(36, 0.4)]},
        "llama-server": {1: [m(10, 0.2)], 4: [m(22, 0.8)]},
    }
    lines = bench.table(res, [1, 4])
    assert lines[0].startswith("| streams | ours agg tok/s") and "llama-server agg tok/s" in lines[0]
    assert lines[2] == "| 1 | 11.0 | 1.00x | 0.20 / 0.40 | 10.0 | 1.00x | 0.20 / 0.40 | **1.10x** | 1.00x |"
    assert lines[3] == "| 4 | 33.0 | 3.00x | 0.40 / 0.80 | 22.0 | 2.20x | 0.80 / 1.60 | **1.50x** | 2.00x |"
    # ours only: no reference columns; short streams are shown
    res = {"ours": {1: [{**m(10, 0.1), "short": 1.0}]}}
    assert bench.table(res, [1])[2] == "| 1 | 10.0 (1 short) | 1.00x | 0.10 / 0.20 |"


def test_the_servers_command_lines() -> None:
    ours = bench.command("ours", None, "m.gguf", 4, 2048, 2, 8081)
    assert ours[:3] == [sys.executable, "-m", "llama_dsv4.server"]
    flags = ["-m", "m.gguf", "-c", "2048", "-np", "4", "-t", "2", "--host", "127.0.0.1", "--port", "8081"]
    assert ours[3:] == flags
    theirs = bench.command("llama-server", "/bin/llama-server", "m.gguf", 4, 2048, 2, 8081)
    assert theirs[:14] == ["/bin/llama-server", *flags, "-cb"]
    assert theirs[14:] == (["--no-repack"] if bench.has_amx() else [])


def run_quick(model: str, *extra: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", model, *extra], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.splitlines()


ROW = r"\| (\d+) \| ([\d.]+)(?: \(\d+ short\))? \| ([\d.]+)x \| ([\d.]+) / ([\d.]+) \|"


def test_quick_mode_against_our_server(real_vocab_path: str) -> None:
    out = run_quick(real_vocab_path)
    assert out[0].startswith("micro-realvocab.gguf") and "-np = streams" in out[0] and "8 tokens per stream" in out[0]
    assert (
        out[1] == "| streams | ours agg tok/s | ours xN/1 | ours ttft med / max s |" and out[2] == "|---|---|---|---|"
    )
    rows = [re.fullmatch(ROW, line) for line in out[3:5]]
    assert all(rows), out
    assert [int(r[1]) for r in rows if r] == [1, 2]
    for r in rows:
        assert r is not None
        agg, ttft_med, ttft_max = float(r[2]), float(r[4]), float(r[5])
        assert agg > 0 and 0 < ttft_med <= ttft_max < 60
    assert rows[0] is not None and rows[0][3] == "1.00"


@pytest.mark.skipif(not os.environ.get("DSV4_LLAMA_SERVER"), reason="$DSV4_LLAMA_SERVER names no llama-server binary")
def test_quick_mode_side_by_side_with_llama_server(real_vocab_path: str) -> None:
    out = run_quick(real_vocab_path, "--llama-server", os.environ["DSV4_LLAMA_SERVER"])
    assert "llama-server agg tok/s" in out[1]
    for line in out[3:5]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 9 and cells[7].startswith("**") and float(cells[7].strip("*x")) > 0
