"""Our C under the strictest warnings of the compilers at hand (issue 21, item 1): the kernels with -Wall -Wextra
-Werror, and the C that Cython generates from our .pyx files with the errors GCC 14 and recent clang turn on by
default (incompatible pointer types, int conversion, implicit declarations), which an older GCC only warns about.
Syntax-only compiles: a few seconds. Each compiler found on PATH (gcc, clang, aarch64-linux-gnu-gcc: the x86
kernels sit behind DSV4_X86, so the ARM build compiles the portable paths) is tried; gcc must be there (the
package's own build needs a C compiler). Where the `ziglang` package is installed (README's strict check: PyPI's
zig, whose `zig cc` is a current clang, 22 in ziglang 0.17.1), its clang compiles the kernels for x86-64 Linux,
aarch64 Linux and arm64 macOS, and the generated C for this machine, with clang's own defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _zig_cc() -> list[str]:
    """PyPI's zig as a C compiler (clang), if the ziglang package is installed; zig passes -c itself, so the
    compiles write to /dev/null instead of -fsyntax-only."""
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return []
    return [sys.executable, "-m", "ziglang", "cc"]


ZIG = _zig_cc()
ZIG_TARGETS = ("x86_64-linux-gnu", "aarch64-linux-gnu", "aarch64-macos")
# gcc and clang of this machine; Debian's aarch64 cross compiler where installed (the C of the ARM build); zig's
# clang for three targets where ziglang is installed
COMPILERS = [c for c in ("gcc", "clang", "aarch64-linux-gnu-gcc") if shutil.which(c)]
COMPILERS += [f"zig:{t}" for t in ZIG_TARGETS] if ZIG else []
GCC14_DEFAULT_ERRORS = [
    "-Werror=incompatible-pointer-types",
    "-Werror=int-conversion",
    "-Werror=implicit-function-declaration",
    "-Werror=implicit-int",
]


def ggml_include() -> str:
    import libggml

    return os.path.join(os.path.dirname(libggml.__file__), "include")


def compile_only(cc: str, source: Path, flags: list[str], includes: list[str]) -> subprocess.CompletedProcess[str]:
    """Compile `source` for diagnostics only: cc is a program on PATH or "zig:<target>"."""
    head = [*ZIG, "-target", cc[4:], "-c", "-o", os.devnull] if cc.startswith("zig:") else [cc, "-fsyntax-only"]
    cmd = [*head, *flags, *(f"-I{i}" for i in includes), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_compiler_is_there() -> None:
    assert "gcc" in COMPILERS, "gcc is needed to build the package"


@pytest.mark.parametrize("cc", COMPILERS)
def test_kernels_compile_with_wall_wextra_werror(cc: str) -> None:
    sources = sorted((ROOT / "kernels").glob("*.c"))
    assert len(sources) >= 8
    for src in sources:
        r = compile_only(cc, src, ["-std=c11", "-Wall", "-Wextra", "-Werror"], [str(ROOT / "kernels"), ggml_include()])
        assert r.returncode == 0, f"{cc} {src.name}:\n{r.stderr[-3000:]}"


# the generated C includes this interpreter's headers (pyconfig.h): compiled for this machine only
@pytest.mark.parametrize("cc", [c for c in COMPILERS if not c.startswith("zig:")] + (["zig:native"] if ZIG else []))
def test_generated_c_has_none_of_the_new_default_errors(cc: str, tmp_path: Path) -> None:
    numpy = pytest.importorskip("numpy")
    pyx = sorted(ROOT.glob("llama_dsv4/**/*.pyx"))
    assert len(pyx) >= 3
    includes = [str(ROOT / "kernels"), ggml_include(), sysconfig.get_paths()["include"], numpy.get_include()]
    for src in pyx:
        out = tmp_path / (src.stem + ".c")
        cy = [sys.executable, "-m", "cython", "-3", "-I", str(ROOT / "vendor"), "-I", str(ROOT / "kernels"), "-I"]
        r = subprocess.run([*cy, str(ROOT), str(src), "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, f"cython {src.name}:\n{r.stderr[-3000:]}"
        r = compile_only(cc, out, GCC14_DEFAULT_ERRORS, includes)
        assert r.returncode == 0, f"{cc} on the C of {src.relative_to(ROOT)}:\n{r.stderr[-3000:]}"
