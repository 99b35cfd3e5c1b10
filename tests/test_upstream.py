"""llama-cpp-python 0.3.36's own test files, run unchanged through the `llama_cpp` alias.

The tests are not copied into this repository: they are read from llama-cpp-python's sdist (tests/llama_cpp_sdist.py:
downloaded from PyPI once per machine; skipped where PyPI cannot be reached). Every test upstream collects runs,
except those DESELECTED says cannot apply to a deepseek4 model, each with its reason; the run checks that the two
together are exactly what upstream collects, and that every selected test passed (none skipped).
A conftest written next to them installs the alias and answers their hf_hub_download of the tiny llama model with
our micro DeepSeek V4 model (real tokenizer); asking for any other model fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import llama_cpp_sdist
import pytest
from llama_cpp_sdist import members

_OTHER_ARCH = "a {} model ({}): another architecture, with its own cache rules; DeepSeek V4 is a transformer"
_RECURRENT = _OTHER_ARCH.format("recurrent", "mamba-130m")
_HYBRID = _OTHER_ARCH.format("hybrid", "Falcon-H1-Tiny")
_CACHE_TESTS = [
    "test_exact_cached_prompt_reuse_matches_fresh",
    "test_loaded_exact_cached_prompt_reuse_matches_fresh",
    "test_ram_cache_exact_prompt_hit_matches_fresh",
    "test_shorter_prompt_prefix_reuse_matches_fresh",
]
# test id -> why it cannot apply to a deepseek4 model
DESELECTED = {
    "test_llama.py::test_llama_cpp_tokenization": (
        "the llama-architecture SPM vocabulary file vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf and its token "
        "ids (tests/test_tokenizer.py checks ours against the DeepSeek V4 tokenizer)"
    ),
    "test_llama.py::test_real_model": (
        "downloads Qwen3.5-0.8B and asserts that vocabulary's token ids for 'Hello, world!'"
    ),
    "test_llama.py::test_real_llama": (
        "trained text: asserts Qwen3.5-0.8B continues 'The quick brown fox' with ' jumps over the lazy dog.'"
    ),
    "test_llama.py::test_real_llama_repeated_prompt_cache": "trained text: the same continuation as test_real_llama",
    "test_llama.py::test_recurrent_model_prompt_cache_reset": _RECURRENT,
    "test_llama.py::test_hybrid_model_prompt_cache_reset": _HYBRID,
    **{f"test_llama.py::{t}[llama_cpp_recurrent_model_path-True-False]": _RECURRENT for t in _CACHE_TESTS},
    **{f"test_llama.py::{t}[llama_cpp_hybrid_model_path-False-True]": _HYBRID for t in _CACHE_TESTS},
    "test_llama.py::test_real_llama_embeddings": (
        "embeddings of an embedding model (bge-small): DeepSeek V4 is a generative model without pooling, and "
        "llama-dsv4 does not compute embeddings"
    ),
}
UPSTREAM_TESTS = 26  # what llama-cpp-python 0.3.36's tests/ collects

CONFTEST = """
import json
import multiprocessing
import pytest
import llama_dsv4.compat
llama_dsv4.compat.install()
import huggingface_hub

# The tests run their tiny model on multiprocessing.cpu_count() threads: let them see one CPU, as on a one-CPU
# machine (ggml's threads meet at a spinning barrier after every op, so on a busy machine two threads are many
# times slower than one on a model this small).
multiprocessing.cpu_count = lambda: 1

TINY, DESELECTED, REPORT = {tiny!r}, {deselected!r}, {report!r}
outcomes = {{}}


def _download(repo_id, filename, *args, **kwargs):
    assert (repo_id, filename) == ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"), (
        f"a selected test asked for {{repo_id}}/{{filename}}, which this run does not provide"
    )
    return TINY


huggingface_hub.hf_hub_download = _download


def pytest_collection_modifyitems(config, items):
    outcomes["collected"] = [item.nodeid for item in items]
    dropped = [item for item in items if item.nodeid in DESELECTED]
    items[:] = [item for item in items if item.nodeid not in DESELECTED]
    config.hook.pytest_deselected(items=dropped)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcomes.setdefault("results", {{}})[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    with open(REPORT, "w") as f:
        json.dump(outcomes, f)
"""


def test_upstream_tests(real_vocab_path: str, llama_cpp_sdist_path: str, tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("scipy")  # test_llama.py imports it
    d = os.path.join(str(tmp_path), "upstream")
    os.makedirs(d)
    for name, data in members(llama_cpp_sdist_path, prefix="tests/").items():
        if name.count("/") == 1 and name.endswith(".py"):
            with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                f.write(data)
    report = os.path.join(str(tmp_path), "report.json")
    with open(os.path.join(d, "conftest.py"), "w") as f:
        f.write(textwrap.dedent(CONFTEST.format(tiny=real_vocab_path, deselected=sorted(DESELECTED), report=report)))
    basetemp = os.path.join(str(tmp_path), "basetemp")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", basetemp, "."],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(r.stdout[-3000:], file=sys.stderr)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    with open(report) as f:
        outcomes = json.load(f)
    collected = set(outcomes["collected"])
    assert len(collected) == UPSTREAM_TESTS, sorted(collected)
    assert set(DESELECTED) <= collected, sorted(set(DESELECTED) - collected)  # no stale entries
    selected = collected - set(DESELECTED)
    assert outcomes["results"] == dict.fromkeys(selected, "passed"), outcomes["results"]
    assert "test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter" in selected


def _unreachable_registry(monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    monkeypatch.setenv("LLAMA_DSV4_TEST_CACHE", cache)
    monkeypatch.delenv("LLAMA_CPP_PYTHON_SDIST", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or local wheel directories
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: connection refused


def test_an_unreachable_registry_skips_with_the_reason(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = os.path.join(str(tmp_path), "cache")
    _unreachable_registry(monkeypatch, cache)
    with pytest.raises(pytest.skip.Exception, match="package registry cannot be reached for llama-cpp-python"):
        llama_cpp_sdist.sdist_path()
    assert os.listdir(cache) == []  # no partial download, no scratch directory


def test_a_wrong_local_sdist_is_refused(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = os.path.join(str(tmp_path), llama_cpp_sdist.SDIST)
    with open(wrong, "wb") as f:
        f.write(b"not the sdist")
    monkeypatch.setenv("LLAMA_CPP_PYTHON_SDIST", wrong)
    with pytest.raises(AssertionError, match="is not PyPI's"):
        llama_cpp_sdist.sdist_path()
