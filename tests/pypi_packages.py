"""Libraries installed from PyPI at test time, pinned, for the tests that run a library's own code against
llama-dsv4 (guidance, outlines, instructor, DSPy, Haystack, ...).

They are not dependencies of the package or of its `[dev]` extra: each set of pinned requirements is installed once
per machine into its own directory under the test cache ($LLAMA_DSV4_TEST_CACHE, default ~/.cache/llama-dsv4-tests),
holding only what the test environment lacks (pip resolves against the running environment, then the missing or
differing distributions are installed there with --no-deps). A test runs the library in a child process whose
`sys.path` puts that directory first (`run_python`), so nothing leaks into the test process.

Where the registry cannot be reached the tests are skipped with pip's reason; any other pip failure fails them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import pytest
from llama_cpp_sdist import cache_dir, skip_if_unreachable

_SCHEMA = 1  # bump when the directory layout changes


def _pip(args: list[str], what: str, timeout: float = 1200) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package registry did not deliver {what} within {timeout:.0f} s")
    if r.returncode != 0:
        said = (r.stdout + r.stderr).strip()
        skip_if_unreachable(said, what)
        pytest.fail(f"pip failed for {what}: {said[-3000:]}")


def site_dir(*requirements: str, no_deps: Sequence[str] = ()) -> str:
    """A directory holding `requirements` (exact pins, e.g. "instructor==1.7.2") and whatever of their dependencies
    the test environment lacks; installed on first use, reused afterwards.

    `no_deps` are pinned requirements installed without their dependencies: an integration whose requirement on
    llama-cpp-python the `llama_cpp` alias stands in for (name the dependencies it does need in `requirements`)."""
    pins = [*requirements, *no_deps]
    assert pins and all("==" in r for r in pins), f"pin every requirement: {pins}"
    key_parts: list[object] = [_SCHEMA, sys.version_info[:2], sorted(requirements)]
    if no_deps:  # the key of a directory without them is unchanged
        key_parts.append(sorted(no_deps))
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()
    target = os.path.join(cache_dir(), "pypi-" + key[:16])
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    what = " ".join(sorted(pins))
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=cache_dir()) as scratch:
        wanted = list(no_deps)
        if requirements:
            report = os.path.join(scratch, "report.json")
            _pip(["install", "--dry-run", "--quiet", "--report", report, *requirements], what)
            with open(report) as f:
                wanted += [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(f)["install"]]
        staging = os.path.join(scratch, "site")
        os.makedirs(staging)
        if wanted:
            _pip(["install", "--no-deps", "--no-compile", "--quiet", "--target", staging, *wanted], what)
        with open(os.path.join(staging, ".complete"), "w") as f:
            f.write("\n".join(wanted) + "\n")
        try:
            os.replace(staging, target)  # one rename: no half-installed directory is ever reused
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(target, ".complete")):
                raise
    return target


def run_python(
    code: str, site: str, *, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child interpreter of this environment with `site` first on its path; fails the test with
    the child's output unless it exits 0."""
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (site, child_env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"
    return r
