"""Build of the Cython layer over ggml.

The extensions link the ggml shipped by the pinned PyPI package libggml-python (a build and run dependency)
and find it at run time through an rpath relative to themselves, so they import with no environment variables.
A wheel's extensions carry only those relative rpaths and are stripped; an in-place (editable) build adds the
build environment's absolute library directory, since it runs from the source tree.
"""

import importlib.util
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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
DARWIN = sys.platform == "darwin"


def relative_rpaths(name: str) -> list[str]:
    """Installed: site-packages/llama_dsv4/_ggml*.so (and engine/*.so one level deeper) -> site-packages/libggml/
    {lib64,lib} (the Linux wheels on PyPI have lib64; the macOS arm64 wheel and a build from the sdist, lib)."""
    up = "/".join([".."] * name.count("."))
    origin = "@loader_path" if DARWIN else "$ORIGIN"
    return [f"{origin}/{up}/libggml/{d}" for d in ("lib64", "lib")]


def rpath_flags(dirs: list[str]) -> list[str]:
    return [f"-Wl,-rpath,{d}" for d in dirs]


class BuildExt(build_ext):
    """A wheel: relative rpaths only, stripped (Linux). In place (editable): the build environment's libggml too."""

    def build_extensions(self) -> None:
        in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        if not in_place:  # the interpreter's own link flags may carry its build machine's rpath (pyenv's do)
            linker = getattr(self.compiler, "linker_so", None)
            if isinstance(linker, list):
                self.compiler.linker_so = [a for a in linker if not a.startswith("-Wl,-rpath,")]
        for ext in self.extensions:
            dirs = relative_rpaths(ext.name) + (lib_dirs if in_place else [])
            ext.extra_link_args = rpath_flags(dirs) + (["-Wl,-s"] if not in_place and not DARWIN else [])
        super().build_extensions()


# Our kernels (kernels/README.md), compiled once into a static library that the extensions link (each takes only
# the objects it uses).
KERNELS = [
    "kernels/dsv4_ops.c",
    "kernels/dsv4_topk.c",
    "kernels/dsv4_gemm_common.c",
    "kernels/dsv4_gemm_vnni.c",
    "kernels/dsv4_moe_gemm.c",
    "kernels/dsv4_hc.c",
    "kernels/dsv4_concat.c",
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
        extra_compile_args=CFLAGS,
    )


exts = [
    extension("llama_dsv4._ggml", "llama_dsv4/_ggml.pyx"),
    extension("llama_dsv4.engine.graph", "llama_dsv4/engine/graph.pyx"),
    extension("llama_dsv4.engine.context", "llama_dsv4/engine/context.pyx"),
]

setup(
    cmdclass={"build_ext": BuildExt},
    libraries=[kernels_lib],
    ext_modules=cythonize(
        exts,
        include_path=[os.path.join(here, "vendor"), os.path.join(here, "kernels"), here],
        compiler_directives={"language_level": "3"},
    ),
)
