"""llama-cpp-python 0.3.36's sdist, read by two test files: its own tests (test_upstream.py) and llama.cpp's DeepSeek
V4 chat template (test_chat_template.py). Nothing of it is copied into this repository.

pip downloads it from the package registry at most once per machine into a cache directory ($LLAMA_DSV4_TEST_CACHE,
default ~/.cache/llama-dsv4-tests; set LLAMA_CPP_PYTHON_SDIST to use a local copy instead). Where the registry
cannot be reached, the tests that need it are skipped with that reason; any other failure fails them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

import pytest

NAME, VERSION = "llama-cpp-python", "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # PyPI's file
TOP = f"llama_cpp_python-{VERSION}/"
DSV4_TEMPLATE = "vendor/llama.cpp/models/templates/deepseek-ai-DeepSeek-V4.jinja"

# What pip says when it could not reach the registry: no version listed at all (it logs the connection errors
# themselves only with -vvv), or a connection lost during the download.
_UNREACHABLE = (
    "(from versions: none)",
    "connection broken by",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Read timed out",
    "Connection reset by peer",
)


def skip_if_unreachable(pip_output: str, what: str) -> None:
    """Skip the test, with pip's last words, when pip's output says the registry could not be reached."""
    if any(m in pip_output for m in _UNREACHABLE):
        last = "\n".join(pip_output.splitlines()[-3:])
        pytest.skip(f"the package registry cannot be reached for {what} (pip: {last})")


def cache_dir() -> str:
    return os.environ.get("LLAMA_DSV4_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-dsv4-tests"
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _download(cache: str) -> None:
    """pip download into a scratch directory inside the cache, then one rename: an interrupted run leaves no
    partial sdist behind, and the scratch directory is removed either way."""
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--timeout", "30", "--retries", "2", "-d", scratch, f"{NAME}=={VERSION}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the package registry did not deliver {SDIST} within 15 minutes")
        got = os.path.join(scratch, SDIST)
        if r.returncode != 0 or not os.path.exists(got):
            said = (r.stdout + r.stderr).strip()
            skip_if_unreachable(said, f"{NAME}=={VERSION}")
            pytest.fail(f"pip could not download {SDIST}: {said[-2000:]}")
        os.replace(got, os.path.join(cache, SDIST))


def sdist_path() -> str:
    """The sdist's path, downloaded on first use and checked against PyPI's SHA-256 (a wrong or truncated cached
    copy is downloaded again; a wrong LLAMA_CPP_PYTHON_SDIST fails)."""
    given = os.environ.get("LLAMA_CPP_PYTHON_SDIST")
    if given:
        assert _sha256(given) == SHA256, f"LLAMA_CPP_PYTHON_SDIST={given} is not PyPI's {SDIST}"
        return given
    path = os.path.join(cache_dir(), SDIST)
    if not (os.path.exists(path) and _sha256(path) == SHA256):
        _download(cache_dir())
        assert _sha256(path) == SHA256, f"{path}: the downloaded file is not PyPI's {SDIST}"
    return path


def members(sdist: str, wanted: list[str] | None = None, prefix: str | None = None) -> dict[str, bytes]:
    """Files of the sdist by path below its top directory: those named in `wanted` and those under `prefix`."""
    out: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        for m in tar:
            name = m.name[len(TOP) :] if m.name.startswith(TOP) else None
            if name and m.isfile() and (name in (wanted or ()) or (prefix and name.startswith(prefix))):
                f = tar.extractfile(m)
                assert f is not None
                out[name] = f.read()
    missing = set(wanted or ()) - set(out)
    assert not missing, f"{sdist} lacks {sorted(missing)}"
    return out
