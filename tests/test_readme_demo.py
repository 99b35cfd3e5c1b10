"""README "The demo model": its three examples run as written on the shipped demo model, and print the tool calls
the model chose (tool_choice auto, no grammar) and the arithmetic it worked: the Python API, LangChain's
ChatLlamaCpp through the llama_cpp alias, and the OpenAI client against `llama-dsv4-server` started with the
README's command (here with `--spec-type draft-mtp` too: the server's /metrics counts the MTP drafts)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import httpx
import pytest
from test_server import Server

from llama_dsv4.demo import demo_model_path

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def block(tag: str) -> str:
    """The fenced block after the marker <!-- demo:TAG --> in the README."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"<!-- demo:{tag} -->\n```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no <!-- demo:{tag} --> block"
    return m.group(1)


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_python_example() -> None:
    out = run(block("python"))
    assert out.splitlines()[0].endswith("= 1001"), out  # the answer (the working's restated operands may slip)
    assert "'name': 'convert_currency'" in out and '"amount": 207, "from": "JPY", "to": "INR"' in out, out


def test_langchain_example() -> None:
    pytest.importorskip("langchain_community")
    out = run(block("langchain"))
    assert "'name': 'convert_currency'" in out and "'amount': 120" in out and "'from': 'GBP'" in out, out


def test_openai_example_against_the_readme_server(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("openai")
    with open(README, encoding="utf-8") as f:
        m = re.search(r"\(`(llama-dsv4-server -m \"\$\(python -m llama_dsv4\.demo\)\" --port 8082)`\)", f.read())
    assert m, "README lacks the server command of the OpenAI example"
    cmd = shlex.split(m.group(1).replace("$(python -m llama_dsv4.demo)", demo_model_path()))
    args = [a for a in cmd[1:] if a not in ("--port", "8082")]
    srv = Server([*args, "-t", "1", "--spec-type", "draft-mtp"], os.path.join(tmp_path, "s.log"))
    try:
        srv.wait_ready()
        out = run(block("openai").replace("127.0.0.1:8082", f"127.0.0.1:{srv.port}"))
        assert "name='convert_currency'" in out and '"amount": 390' in out and '"from": "JPY"' in out, out
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        drafted = re.search(r"^llamadsv4:spec_decode_num_draft_tokens_total (\S+)$", metrics, re.M)
        assert drafted and float(drafted.group(1)) > 0, metrics
        assert "llamadsv4:spec_decode_num_accepted_tokens_per_pos_total{" in metrics
    finally:
        assert srv.stop() == 0, srv.log()
