"""Build of the Cython layer over ggml.

The extension links the ggml shipped by the pinned PyPI package libggml-python (a build and run dependency)
and finds it at run time through an rpath relative to itself, so it imports with no environment variables.
"""

import importlib.util
import os

from Cython.Build import cythonize
from setuptools import Extension, setup


def libggml_dirs() -> tuple[str, list[str]]:
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("libggml-python is not installed in the build environment (see pyproject.toml)")
    root = next(iter(spec.submodule_search_locations))
    libs = [d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib")) if os.path.isdir(d)]
    if not libs:
        raise RuntimeError(f"no lib64/ or lib/ in {root}")
    return os.path.join(root, "include"), libs


inc, lib_dirs = libggml_dirs()
here = os.path.dirname(os.path.abspath(__file__))
# Installed: site-packages/llama_dsv4/_ggml*.so -> site-packages/libggml/{lib64,lib}. The absolute build-time
# directories come last, for in-place (editable) builds.
rpaths = ["$ORIGIN/../libggml/lib64", "$ORIGIN/../libggml/lib", *lib_dirs]

# Our kernels (kernels/README.md), compiled once into a static library that the extensions link (each takes only
# the objects it uses).
KERNELS = [
    "kernels/dsv4_ops.c",
    "kernels/dsv4_topk.c",
    "kernels/dsv4_gemm_common.c",
    "kernels/dsv4_gemm_vnni.c",
    "kernels/dsv4_moe_gemm.c",
    "kernels/dsv4_hc.c",
    "kernels/dsv4_threads.c",
    "kernels/dsv4_prefetch.c",
    "kernels/dsv4_rpc_buft.c",
]
CFLAGS = ["-O3", "-ffp-contract=off", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
GGML_LIBS = ["ggml", "ggml-base", "ggml-cpu"]
kernels_lib = ("dsv4_kernels", {"sources": KERNELS, "include_dirs": [inc, "kernels"], "cflags": CFLAGS})


def extension(name: str, pyx: str) -> Extension:
    return Extension(
        name,
        sources=[pyx],
        include_dirs=[inc, os.path.join(here, "kernels")],
        library_dirs=lib_dirs,
        libraries=["dsv4_kernels", *GGML_LIBS],
        runtime_library_dirs=rpaths,
        extra_compile_args=CFLAGS,
    )


exts = [
    extension("llama_dsv4._ggml", "llama_dsv4/_ggml.pyx"),
    extension("llama_dsv4.engine.graph", "llama_dsv4/engine/graph.pyx"),
    extension("llama_dsv4.engine.context", "llama_dsv4/engine/context.pyx"),
]

setup(
    libraries=[kernels_lib],
    ext_modules=cythonize(
        exts,
        include_path=[os.path.join(here, "vendor"), os.path.join(here, "kernels"), here],
        compiler_directives={"language_level": "3"},
    ),
)
