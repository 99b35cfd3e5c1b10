"""llama-cpp-python 0.3.36's own tests that need no specific model (shared/specs/llama-cpp-python-api.md §6),
run unchanged through the `llama_cpp` alias.

The tests are not copied into this repository: they are read from llama-cpp-python's sdist, which pip downloads
from PyPI once (set LLAMA_CPP_PYTHON_SDIST to a local copy of llama_cpp_python-0.3.36.tar.gz to skip the download).
A conftest written next to them installs the alias and answers their hf_hub_download of the tiny llama model with
our tiny DeepSeek V4 model (real tokenizer). Deselected: tests of other architectures (recurrent, hybrid), of
specific downloaded models, embeddings, the SPM tokenizer, and the chat-format helpers of other model families.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SELECTED = [
    "test_llama.py::test_llama_cpp_version",
    "test_llama.py::test_exact_cached_prompt_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_loaded_exact_cached_prompt_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_ram_cache_exact_prompt_hit_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama.py::test_shorter_prompt_prefix_reuse_matches_fresh[llama_cpp_transformer_model_path-False-False]",
    "test_llama_grammar.py",
    "test_llama_speculative.py",
]


def _sdist(cache: str) -> str:
    path = os.environ.get("LLAMA_CPP_PYTHON_SDIST") or os.path.join(cache, SDIST)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "llama-cpp-python==0.3.36",
                "-d",
                cache,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0 and os.path.exists(path), f"could not download the sdist from PyPI: {r.stderr[-2000:]}"
    return path


def test_upstream_portable_tests(real_vocab_path: str, tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("scipy")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-dsv4", "upstream")
    d = os.path.join(str(tmp_path), "upstream")
    os.makedirs(d)
    with tarfile.open(_sdist(cache)) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                m.name = parts[2]
                tar.extract(m, d, filter="data")
    with open(os.path.join(d, "conftest.py"), "w") as f:
        f.write(
            textwrap.dedent(f"""
            import pytest
            import llama_dsv4.compat
            llama_dsv4.compat.install()
            import huggingface_hub

            TINY = {real_vocab_path!r}

            def _download(repo_id, filename, *args, **kwargs):
                if (repo_id, filename) == ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"):
                    return TINY
                pytest.skip(f"model {{repo_id}}/{{filename}} is not part of this run")

            huggingface_hub.hf_hub_download = _download
            """)
        )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SELECTED],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(r.stdout[-3000:], file=sys.stderr)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "9 passed" in r.stdout
