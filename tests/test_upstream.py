"""llama-cpp-python 0.3.36's own tests that need no specific model (docs/llama-cpp-python-api.md §3),
run unchanged through the `llama_cpp` alias.

The tests are not copied into this repository: they are read from llama-cpp-python's sdist (tests/llama_cpp_sdist.py:
downloaded from PyPI once per machine; skipped where PyPI cannot be reached).
A conftest written next to them installs the alias and answers their hf_hub_download of the tiny llama model with
our tiny DeepSeek V4 model (real tokenizer). Deselected: tests of other architectures (recurrent, hybrid), of
specific downloaded models, embeddings, the SPM tokenizer, and the chat-format helpers of other model families.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import llama_cpp_sdist
import pytest
from llama_cpp_sdist import members

SELECTED = [
    "test_llama.py::test_llama_cpp_version",
    "test_llama.py::test_exact_cached_prompt_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_loaded_exact_cached_prompt_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_ram_cache_exact_prompt_hit_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_shorter_prompt_prefix_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama_grammar.py",
    "test_llama_speculative.py",
]


def test_upstream_portable_tests(real_vocab_path: str, llama_cpp_sdist_path: str, tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("scipy")
    d = os.path.join(str(tmp_path), "upstream")
    os.makedirs(d)
    for name, data in members(llama_cpp_sdist_path, prefix="tests/").items():
        if name.count("/") == 1 and name.endswith(".py"):
            with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                f.write(data)
    with open(os.path.join(d, "conftest.py"), "w") as f:
        f.write(
            textwrap.dedent(f"""
            import multiprocessing
            import pytest
            import llama_dsv4.compat
            llama_dsv4.compat.install()
            import huggingface_hub

            # The tests run their tiny model on multiprocessing.cpu_count() threads: let them see one CPU, as on a
            # one-CPU machine (ggml's threads meet at a spinning barrier after every op, so on a busy machine two
            # threads are many times slower than one on a model this small).
            multiprocessing.cpu_count = lambda: 1

            TINY = {real_vocab_path!r}

            def _download(repo_id, filename, *args, **kwargs):
                if (repo_id, filename) == ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"):
                    return TINY
                pytest.skip(f"model {{repo_id}}/{{filename}} is not part of this run")

            huggingface_hub.hf_hub_download = _download
            """)
        )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            os.path.join(str(tmp_path), "basetemp"),
            *SELECTED,
        ],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(r.stdout[-3000:], file=sys.stderr)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "9 passed" in r.stdout


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
