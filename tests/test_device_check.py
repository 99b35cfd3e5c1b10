"""bench/device_check.py, the table a machine with an accelerator prints (docs/install.md): here, with no GPU, run
with the CPU as the device on one forward model and a small file, so that the script does not rot; without a GPU
and without --device it says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_dsv4 import _ggml
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_check.py"
ENV = {**os.environ, "LLAMA_DSV4_GOVERNOR": "off"}


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "HOME": str(tmp_path)}  # whatever the script writes under ~ stays in the test's folder
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )


def test_device_check_runs_with_the_cpu_as_the_device(tmp_path: Path) -> None:
    p = DSV4Params(n_embd=256, n_layer=2, compress_ratios=(4, 128), n_expert=8, n_expert_used=2, expert_ff=256)
    path = write_model(str(tmp_path / "m.gguf"), p, dtype="q8xq5", vocab="small")[0]
    r = run(
        tmp_path, "--device", "cpu", "--forward-models", "decisive-q8xq5", "--model", path, "--tokens", "4",
        "--hot-experts", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    row = next(line for line in lines if line.startswith("| decisive-q8xq5 |")).split("|")
    assert row[-2].strip() == "ok" and float(row[4]) == 1.0, row  # argmax agreement with llama.cpp's logits
    nodes = next(line for line in lines if line.startswith("| tiny q8xq5, one token |")).split("|")
    assert int(nodes[2]) > 100, nodes  # every node of a decode step on the CPU
    speed = next(line for line in lines if line.startswith("| cpu |")).split("|")
    assert all(float(x) > 0 for x in speed[2:5]), speed
    hot = next(line for line in lines if line.startswith("| decisive-q8xq5 (hot experts) |")).split("|")
    assert hot[-2].strip() == "ok" and hot[2:6] == row[2:6], (row, hot)  # on the CPU: the same logits, bit for bit
    nodes_hot = next(line for line in lines if line.startswith("| tiny q8xq5, one token, hot experts |")).split("|")
    assert int(nodes_hot[2]) > int(nodes[2]), (nodes, nodes_hot)  # the split graph: both sides of every MoE
    speed_hot = next(line for line in lines if line.startswith("| cpu, 2 hot experts |")).split("|")
    assert all(float(x) > 0 for x in speed_hot[2:5]), speed_hot


def test_device_check_defaults_to_the_first_gpu_or_says_how_to_run(tmp_path: Path) -> None:
    gpus = [d["name"] for d in _ggml.devices() if d["type"] in ("gpu", "igpu")]
    if gpus:  # a GPU build with a device (bench/device_check.sh's machine): the check runs there by default
        r = run(tmp_path, "--forward-models", "decisive", "--skip-speed")
        assert r.returncode == 0 and r.stdout.splitlines()[0].endswith(f": {gpus[0]}"), r.stdout + r.stderr
    else:
        r = run(tmp_path)
        assert r.returncode != 0 and "no GPU device" in r.stderr and "--device cpu" in r.stderr, r.stderr


def test_metal_expert_counts_without_a_kernel_are_refused() -> None:
    """ggml 0.20.2's Metal backend accepts MUL_MAT_ID for any expert count but aborts in prompt processing on counts
    it has no id-map kernel for (docs/metal.md): a ValueError when the context is made instead."""
    from llama_dsv4.engine.device_limits import check_device_limits

    for k in (1, 2, 4, 5, 6, 8, 10, 16, 22):
        check_device_limits(["MTL0", "CPU"], k)
    for k in (3, 7, 9, 12):
        with pytest.raises(ValueError, match=f"MTL0: .* no expert-product kernel for {k} experts per token"):
            check_device_limits(["MTL0", "CPU"], k)
        check_device_limits(["CUDA0", "CPU"], k)  # other devices: no such limit known
        check_device_limits(["CPU"], k)


def test_a_gpu_build_without_a_device_says_the_cpu_runs_everything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CUDA build of libggml on a machine with no NVIDIA GPU or driver registers its CUDA backend with no device
    (docs/install.md, "CUDA"): "auto" takes the CPU, and the loading summary (Llama's, the CLI's) says why."""
    from llama_dsv4.cli import main as cli_main
    from llama_dsv4.engine import runtime

    assert _ggml.registered_backends()["CPU"] == 1
    assert _ggml.idle_accelerators() == [n for n, k in _ggml.registered_backends().items() if k == 0 and n != "RPC"]
    cpu_only = _ggml.Backends("auto", 1)
    if any(d["type"] in ("gpu", "igpu") for d in _ggml.devices()):
        assert " + " in runtime.device_summary(cpu_only)  # a GPU build with its device: the GPU, then the CPU
        return
    if not _ggml.idle_accelerators():  # PyPI's CPU build (a CUDA build without a device says so: below)
        assert runtime.device_summary(cpu_only) == "CPU"
        monkeypatch.setattr(_ggml, "idle_accelerators", lambda: ["CUDA"])
    note = runtime.device_summary(cpu_only)
    assert note.startswith("CPU (this libggml has ggml's CUDA backend, which found no device") and "CPU)" in note
    capsys.readouterr()
    assert cli_main(["-p", "What", "-n", "2", "-t", "1", "--no-preload"]) == 0  # the demo model
    assert f"repeats this run), on {note}\n" in capsys.readouterr().err
    assert cli_main(["--info", "-n", "0", "-t", "1"]) == 0
    assert f"backends    {note}, 1 threads" in capsys.readouterr().out
    assert runtime.device_summary(None) == "split across RPC servers"
