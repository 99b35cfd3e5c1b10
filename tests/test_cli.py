"""`llama-dsv4`, the command line: README's main-job command (the embedded trained demo model answers two sums
it never saw; it ships in the package: no download, nothing written, no stdin), a prompt completed exactly as
Llama completes it, chat on stdin, -hf through the hub download, --info, and bad arguments."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest

from llama_dsv4 import Llama
from llama_dsv4.cli import main as cli_main
from llama_dsv4.demo import DEMO_NAME_PREFIX, DEMO_QUESTIONS

GENERATED = re.compile(r"generated (\d+) tokens in [\d.]+ s \(([\d.]+|-) tokens/s\)")


def command() -> list[str]:
    """The installed `llama-dsv4` script (README's command), or the module when the script is not installed."""
    script = os.path.join(os.path.dirname(sys.executable), "llama-dsv4")
    if os.path.exists(script):
        return [script]
    found = shutil.which("llama-dsv4")
    return [found] if found else [sys.executable, "-m", "llama_dsv4"]


def test_readme_main_job_runs_the_demo_model(tmp_path: Any) -> None:
    env = {**os.environ, "LLAMA_DSV4_CACHE": str(tmp_path), "HOME": str(tmp_path)}  # nothing cached, nothing fetched
    r = subprocess.run(command(), capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "embedded demo model" in r.stderr and DEMO_NAME_PREFIX in r.stderr  # the note is a log line: stderr
    assert "NOTE" not in r.stdout  # stdout is the conversation alone
    assert "loading [" in r.stderr and "100%" in r.stderr  # the progress bar (one line when not a terminal)
    # the trained model answers the questions (held out of its training), greedy: the working, then the answer
    (q1, q2) = DEMO_QUESTIONS
    assert r.stdout.startswith(f"> {q1}\n") and f"\n> {q2}\n" in r.stdout
    for q, answer in zip(DEMO_QUESTIONS, r.stdout.split(f"> {q2}\n"), strict=True):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q).groups()  # type: ignore[union-attr]
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert f"= {value}\n" in answer, r.stdout
    m = GENERATED.search(r.stderr)
    assert m, r.stderr
    assert 1 <= int(m.group(1)) <= 160 and m.group(2) != "-"
    assert os.listdir(tmp_path) == []  # the model ships with the package: nothing written


def test_prompt_is_completed_as_llama_completes_it(real_vocab_path: str) -> None:
    llm = Llama(real_vocab_path, n_ctx=4096, verbose=False, n_threads=1)
    expected = llm("Once upon a time,", max_tokens=8, temperature=0)["choices"][0]["text"]
    llm.close()
    r = subprocess.run(
        [*command(), "-m", real_vocab_path, "-p", "Once upon a time,", "-n", "8", "-t", "1", "--temp", "0"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time," + expected + "\n"
    m = GENERATED.search(r.stderr)
    assert m and 1 <= int(m.group(1)) <= 8, r.stderr
    assert "RANDOM" not in r.stdout


SEED = re.compile(r"seed (\d+) \(-s (\d+) repeats this run\)")


def test_default_seed_is_random_per_run_and_s_repeats_it(real_vocab_path: str) -> None:
    """-s -1 (the default) draws a seed per run and logs it; -s with that seed gives that run's text again."""
    cmd = [*command(), "-m", real_vocab_path, "-p", "Once upon a time,", "-n", "16", "-t", "1", "--no-preload"]
    cmd += ["--temp", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0"]

    def start(*extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p: subprocess.Popen[str]) -> tuple[str, str]:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return out, err

    first, second = (finish(p) for p in [start(), start()])  # two default runs, side by side
    seeds = [SEED.search(err) for _, err in (first, second)]
    assert seeds[0] and seeds[1] and all(m.group(1) == m.group(2) for m in seeds), (first[1], second[1])
    assert seeds[0].group(1) != seeds[1].group(1) and first[0] != second[0]
    again, err = finish(start("-s", seeds[0].group(1)))
    assert again == first[0] and f"seed {seeds[0].group(1)}" in err and "repeats" not in err


def test_chat_mode_reads_turns_from_stdin(
    real_vocab_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\nAnd again\n/exit\nnot read\n"))
    args = ["-m", real_vocab_path, "-cnv", "-n", "3", "-t", "1", "--temp", "0", "-sys", "Be brief.", "--no-preload"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    turns = out.split("\n> ")  # a prompt for each line read: two turns, an empty line (skipped), /exit
    assert len(turns) == 5 and [bool(t.strip()) for t in turns] == [False, True, False, True, False], turns
    assert len(GENERATED.findall(err)) == 2 and "chat mode" in err


def test_a_model_whose_template_cannot_be_used_still_chats(hostile_template_path: str, tmp_path: Any) -> None:
    """The file's template made the CLI exit with a traceback (IndentationError); now ours is used, with a
    warning; a --chat-template-file that cannot be used is an error message, not a traceback."""
    r = subprocess.run(
        [*command(), "-m", hostile_template_path, "-cnv", "-n", "2", "-t", "1", "--no-preload"],
        input="Hello\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "using llama-dsv4's DeepSeek V4 template" in r.stderr and "Traceback" not in r.stderr
    assert len(GENERATED.findall(r.stderr)) == 1
    bad = tmp_path / "deep.jinja"
    bad.write_text("{% if messages %}" * 99 + "x" + "{% endif %}" * 99)
    args = ["-p", "x", "-n", "1", "-t", "1", "--no-preload", "--chat-template-file", str(bad)]
    r = subprocess.run(
        [*command(), "-m", hostile_template_path, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 1 and "error: the chat template nests blocks more than 16 deep" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_hf_goes_through_the_hub_download(
    real_vocab_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import llama_dsv4.hub

    calls = []

    def download(repo_id: str, filename: str | None, **kw: Any) -> str:
        calls.append((repo_id, filename))
        return real_vocab_path

    monkeypatch.setattr(llama_dsv4.hub, "download", download)
    args = ["-hf", "someone/DeepSeek-V4-GGUF:Q8xQ5", "-p", "Hi", "-n", "2", "-t", "1", "--no-preload"]
    assert cli_main(args) == 0
    assert calls == [("someone/DeepSeek-V4-GGUF", "*Q8xQ5*.gguf")]
    assert capsys.readouterr().out.startswith("Hi")
    assert cli_main(["-hf", "someone/repo", "-hff", "x-00001-of-00002.gguf", "-p", "Hi", "-n", "1", "-t", "1"]) == 0
    assert calls[-1] == ("someone/repo", "x-00001-of-00002.gguf")
    capsys.readouterr()
    assert cli_main(["-hf", "someone/repo", "--info", "-n", "0", "-t", "1"]) == 0
    assert calls[-1] == ("someone/repo", "") and "129280 tokens" in capsys.readouterr().out


def test_info_keeps_the_model_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--info", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "embedded demo model" in out and "2048 tokens" in out and "1 MTP" in out and "zero-copy" in out
    assert "greedy      [" in out and "tokens/s" in out
    assert cli_main(["--info", "-t", "1", "-n", "2", "--no-mmap"]) == 0  # llama.cpp's spelling of use_mmap=False
    out = capsys.readouterr().out
    assert "weights read into memory on CPU" in out and "greedy      [" in out


def test_moe_prefetch_reaches_llama(real_vocab_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--moe-prefetch is Llama's moe_prefetch: with --no-mmap it is refused as Llama refuses it; with the mapped file
    the completion is the one without it (prefetch changes no result)."""
    assert cli_main(["-m", real_vocab_path, "--moe-prefetch", "--no-mmap", "-n", "1", "-t", "1"]) == 1
    assert "moe_prefetch asks the kernel" in capsys.readouterr().err
    args = ["-m", real_vocab_path, "-p", "Once upon a time,", "-n", "6", "-t", "1", "--temp", "0", "--no-preload"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main([*args, "--moe-prefetch"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("Once upon a time,")


def test_bad_arguments(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["--bogus"])
    assert e.value.code == 2 and "unknown argument(s): --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["-n", "many"])
    assert e.value.code == 2 and "--n-predict takes an integer" in capsys.readouterr().err
    assert cli_main(["-m", os.path.join(str(tmp_path), "missing.gguf")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["-m", "x.gguf", "-hf", "a/b"]) == 2
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    assert cli_main(["-m", str(bad), "--no-preload"]) == 1
    assert "error:" in capsys.readouterr().err


def test_console_scripts_resolve() -> None:
    tomllib = pytest.importorskip("tomllib")
    import importlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == {"llama-dsv4", "llama-dsv4-server", "llama-dsv4-rpc-server"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
