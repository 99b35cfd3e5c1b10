"""The test suite itself: a passing run leaves nothing under the temporary directory (pyproject's
tmp_path_retention_policy; the suite writes ~0.8 GB of test models there)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
def test_writes(tmp_path, tmp_path_factory):
    (tmp_path / "per-test").write_bytes(b"x" * 4096)
    (tmp_path_factory.mktemp("session") / "model.gguf").write_bytes(b"y" * 4096)
"""


def test_a_passing_run_leaves_no_temporary_files(tmp_path: os.PathLike[str]) -> None:
    work, tmp = os.path.join(tmp_path, "work"), os.path.join(tmp_path, "tmp")
    os.makedirs(work)
    os.makedirs(tmp)
    with open(os.path.join(work, "test_probe.py"), "w") as f:
        f.write(PROBE)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pyproject.toml")]
    cmd += ["--rootdir", work, os.path.join(work, "test_probe.py")]
    r = subprocess.run(cmd, cwd=work, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert os.listdir(tmp) != []  # the run did use this directory (pytest-of-<user>/)
    left = [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files]
    assert left == [], left
