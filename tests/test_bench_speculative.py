"""bench/speculative.py, the benchmark behind README's "Speculative decoding" tables: one short round on the demo
model, our engine plain and with MTP drafts, and the side-by-side table against llama.cpp's in-process driver,
here a stand-in script that prints what llama-speculative-simple prints (the real one is built from the
reference's source, tools/oracle/build_server.sh llama-speculative-simple, minutes of compiling): its figures are
parsed, a run whose log lost them is run again, a failing one is an error naming the binary."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speculative.py"

# llama-speculative-simple's closing lines (stderr); the first call of every prompt "loses" them (printed nothing),
# as its log thread now and then does at exit
FAKE = """#!/bin/sh
count="$(dirname "$0")/calls"
echo x >> "$count"
if [ $(( $(wc -l < "$count") % 2 )) -eq 1 ]; then echo "generated text"; exit 0; fi
echo "generated text"
echo "I encoded   16 tokens in    0.022 seconds, speed:  737.395 t/s" >&2
echo "I decoded   40 tokens in    0.100 seconds, speed:  400.000 t/s" >&2
echo "I n_drafted = 20" >&2
echo "I n_accept  = 15" >&2
"""


def _run(tmp_path: Path, binary: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "1", "--rounds", "1", "--tokens", "8", "--llama-speculative", str(binary)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "LLAMA_DSV4_GOVERNOR": "off"},
        timeout=300,
    )


def test_speculative_bench_against_llama_cpp_in_process(tmp_path: Path) -> None:
    fake = tmp_path / "llama-speculative-simple"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = _run(tmp_path, fake)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in r.stdout.splitlines() if line.startswith("| ")}
    assert float(rows["plain"][2]) > 0 and float(rows["mtp 1 (5/5 texts = plain)"][2]) > 0, r.stdout
    ours = float(rows["mtp 1 (5/5 texts = plain)"][2])
    side = rows["N = 1"]  # ours in process, theirs (5 prompts x 40 tokens in 5 x 0.1 s = 400/s), the ratio
    assert float(side[2]) == ours and float(side[3]) == 400.0, r.stdout
    assert side[4].strip(" *") == f"{ours / 400.0:.2f}"
    assert side[5].strip().endswith("/ 0.75")  # 5 x 15 accepted of 5 x 20 drafted
    assert len((tmp_path / "calls").read_text().split()) == 10  # each prompt run twice: the first lost its figures


def test_speculative_bench_names_a_failing_binary(tmp_path: Path) -> None:
    bad = tmp_path / "broken"
    bad.write_text("#!/bin/sh\necho 'error: unknown argument' >&2\nexit 1\n")
    bad.chmod(bad.stat().st_mode | stat.S_IXUSR)
    r = _run(tmp_path, bad)
    assert r.returncode != 0 and "broken failed (exit 1)" in r.stderr and "unknown argument" in r.stderr
