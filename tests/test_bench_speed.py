"""bench/speed.py, the speed harness behind README's "Speed" tables: one round of our engine on a file our writer
makes in a community quantization mix (the table's rows, sane values, the decode ceiling), as a user reproducing
the "Quantized files" table runs it; the reference column needs the oracle and is not run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "speed.py"


def test_speed_harness_runs_on_a_k_quant_mix(tmp_path: Path) -> None:
    # rows of 256 so that the K-quant types (and our products for them) are used; experts of 256 columns
    p = DSV4Params(n_embd=256, n_layer=2, compress_ratios=(4, 128), n_expert=8, n_expert_used=2, expert_ff=256)
    path = write_model(str(tmp_path / "q4.gguf"), p, dtype="Q4_K_M", vocab="small")[0]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", path, "--depths", "0", "--rounds", "1", "--threads", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "LLAMA_DSV4_GOVERNOR": "off"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line and not line.startswith(" ")}
    for metric in ("load", "pp64cold", "pp64", "pp512", "ttft", "tg128@0", "rss"):
        assert metric in rows, r.stdout
        assert float(rows[metric][2]) > 0, rows[metric]  # "metric unit value": a positive measurement
    assert "decode ceiling" in r.stdout and "tokens/s" in r.stdout
