"""Compile tests/opgraph.pyx (the test-only OpGraph) on first use, into the test cache.

The extension links the same ggml as the package and compiles the kernels it calls from kernels/; the build is
keyed on the hash of every source, so an edit rebuilds it and an unchanged tree reuses it (a few seconds of
compiling once per machine and source state).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types

from llama_cpp_sdist import cache_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNELS = [
    "dsv4_ops.c",
    "dsv4_topk.c",
    "dsv4_gemm_common.c",
    "dsv4_gemm_vnni.c",
    "dsv4_moe_gemm.c",
    "dsv4_hc.c",
    "dsv4_concat.c",
]

_SETUP = """
import importlib.util, os, sys
from Cython.Build import cythonize
from setuptools import Extension, setup

root, src, kernels = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
del sys.argv[1:4]
pyx = os.path.basename(src)  # a copy in the scratch directory: the generated C stays out of the source tree
with open(src, "rb") as f, open(pyx, "wb") as out:
    out.write(f.read())
pkg = next(iter(importlib.util.find_spec("libggml").submodule_search_locations))
libs = [d for d in (os.path.join(pkg, "lib64"), os.path.join(pkg, "lib")) if os.path.isdir(d)]
kdir = os.path.join(root, "kernels")
ext = Extension(
    "opgraph",
    sources=[pyx, *(os.path.join(kdir, k) for k in kernels)],
    include_dirs=[os.path.join(pkg, "include"), kdir],
    library_dirs=libs,
    libraries=["ggml", "ggml-base", "ggml-cpu"],
    runtime_library_dirs=libs,
    extra_compile_args=["-O2", "-ffp-contract=off", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"],
)
setup(
    name="opgraph",
    script_args=sys.argv[1:],
    ext_modules=cythonize([ext], include_path=[os.path.join(root, "vendor"), kdir, root], quiet=True,
                          compiler_directives={"language_level": "3"}),
)
"""


def _key() -> str:
    h = hashlib.sha256(repr((sys.version_info[:2], sys.executable, KERNELS)).encode())
    sources = [os.path.join(HERE, "opgraph.pyx"), os.path.join(ROOT, "vendor", "ggml.pxd")]
    sources += sorted(
        [*glob.glob(os.path.join(ROOT, "kernels", "*.[ch]")), os.path.join(ROOT, "kernels", "dsv4_ops.pxd")]
    )
    sources += [os.path.join(ROOT, "llama_dsv4", "_ggml.pxd")]
    for path in sources:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def load(cache: str) -> types.ModuleType:
    """The compiled opgraph module (built into `cache` if this source state has not been built there yet)."""
    out = os.path.join(cache, "opgraph-" + _key())
    found = glob.glob(os.path.join(out, "opgraph*.so"))
    if not found:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".opgraph-", dir=cache) as scratch:
            lib = os.path.join(scratch, "lib")
            cmd = [sys.executable, "-c", _SETUP, ROOT, os.path.join(HERE, "opgraph.pyx"), ",".join(KERNELS)]
            cmd += ["build_ext", "--build-lib", lib, "--build-temp", os.path.join(scratch, "tmp")]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"building tests/opgraph.pyx failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
            with contextlib.suppress(OSError):  # another process finished first
                os.replace(lib, out)
        found = glob.glob(os.path.join(out, "opgraph*.so"))
    spec = importlib.util.spec_from_file_location("opgraph", found[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OpGraph = load(cache_dir()).OpGraph  # built when a test module first imports this one
