"""The installed package: the extension loads the pinned libggml through its rpath, the backend registry is
used, and type sizes agree with the GGUF spec (the CLI's tests are in test_cli.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llama_dsv4
from llama_dsv4 import _ggml
from llama_dsv4.model.gguf_format import GGMLType


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the loaded libraries from /proc (Linux)")
def test_extension_loads_pinned_libggml_without_environment() -> None:
    code = (
        "import llama_dsv4._ggml as g, libggml, os\n"
        "maps = open('/proc/self/maps').read()\n"
        "root = os.path.dirname(libggml.__file__)\n"
        "libs = {l.split()[-1] for l in maps.splitlines() if 'libggml' in l and l.split()[-1].startswith('/')}\n"
        "assert libs and all(p.startswith(root) for p in libs), libs\n"
        "print(len(g.devices()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_", "PYTHONPATH"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 1


def test_registry_devices_and_backends() -> None:
    devs = _ggml.devices()
    assert any(d["type"] == "cpu" for d in devs)
    b = _ggml.Backends("cpu", 2)
    assert b.names[-1] == "CPU" and b.threads == 2
    b.set_threads(1)
    assert b.threads == 1
    with pytest.raises(ValueError, match="unknown device 'no-such-gpu'"):
        _ggml.Backends("no-such-gpu")
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        b.set_threads(0)


def test_type_sizes_match_the_gguf_spec() -> None:
    gguf = pytest.importorskip("gguf")
    for t in GGMLType:
        name, blck, tsize, _ = _ggml.type_traits(int(t))
        assert (blck, tsize) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))], name
    assert _ggml.type_traits(4) is None and _ggml.type_traits(10_000) is None and _ggml.type_traits(-1) is None


def test_quantize_round_trip_and_errors() -> None:
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    for t, tol in ((GGMLType.Q8_0, 1 / 127), (GGMLType.Q5_K, 0.08), (GGMLType.F16, 1e-3)):
        q = _ggml.quantize(x, int(t))
        y = _ggml.dequantize(q.tobytes(), int(t), x.size).reshape(x.shape)
        assert np.abs(y - x).max() <= tol * np.abs(x).max()
    with pytest.raises(ValueError, match="multiple of 256"):
        _ggml.quantize(x[:, :100], int(GGMLType.Q5_K))
    with pytest.raises(ValueError, match="take"):
        _ggml.dequantize(b"\0" * 10, int(GGMLType.Q8_0), 32)
    with pytest.raises(ValueError, match="unknown ggml type"):
        _ggml.quantize(x, 4)


def test_the_shipped_extension_has_no_test_helpers() -> None:
    from llama_dsv4 import _ggml

    assert not hasattr(_ggml, "OpGraph")  # tests/opgraph.pyx, built at test time


def test_version() -> None:
    assert llama_dsv4.__version__ == "0.1.0"


def test_a_source_tree_without_the_build_says_how_to_build_it(tmp_path: os.PathLike[str]) -> None:
    """The package's files without the compiled extensions (a fresh clone imported from its root): the ImportError
    says to install or to build in place, not "circular import"."""
    src = os.path.dirname(os.path.abspath(llama_dsv4.__file__))
    shutil.copytree(src, os.path.join(tmp_path, "llama_dsv4"), ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c"))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import llama_dsv4"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: llama_dsv4 at ") and "has no compiled extension llama_dsv4." in last, last
    assert "`pip install .`" in last and "`pip install -e .`" in last and "build_ext --inplace" in last, last
    assert "circular" not in r.stderr
