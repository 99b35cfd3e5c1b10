"""`python -m llama_dsv4.compat enable | disable | status`: the `llama_cpp` alias for every process of a Python
environment, so `import llama_cpp` and `python -m llama_cpp.server` run llama-dsv4 without code changes.

`enable` writes one file, `llama_dsv4_compat.pth`, into the environment's site-packages (or --user's, or
--site-dir's). Python runs its one `import` line at startup: it defines a small finder and puts it first on
sys.meta_path, importing nothing else (no llama-dsv4, no numpy: startup stays as fast). When code first imports
`llama_cpp`, the finder imports llama-dsv4 and installs the alias (compat.install, compat/finder.py).

Where a real llama-cpp-python is installed too, the alias wins (its finder runs before the path finder); `status`
says so, `llama_cpp.__llama_dsv4__` is True in the process, and `LLAMA_DSV4_COMPAT=0` in the environment of one
process lets the real one through. `disable` removes the file. A stale file (llama-dsv4 uninstalled first) does
nothing: the finder steps aside when llama-dsv4 cannot be found.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import site
import sys
import sysconfig

PTH_NAME = "llama_dsv4_compat.pth"

# The code the .pth line runs at every interpreter start: the standard library only, nothing imported until an
# import of llama_cpp asks. (Kept in one string: a .pth file runs lines, not modules.)
HOOK = '''
def _llama_dsv4_alias():
    import sys

    class LlamaCppAlias:
        """llama-dsv4's `llama_cpp` alias (python -m llama_dsv4.compat disable removes it)."""

        llama_dsv4_alias = "pth"
        resolving = False

        def find_spec(self, name, path=None, target=None):
            if (name != "llama_cpp" and not name.startswith("llama_cpp.")) or self.resolving:
                return None
            import os

            if os.environ.get("LLAMA_DSV4_COMPAT", "").strip().lower() in ("0", "off", "false", "no"):
                return None
            import importlib.util

            self.resolving = True
            try:
                if importlib.util.find_spec("llama_dsv4") is None:
                    return None  # llama-dsv4 is gone: stay out of the way
                from llama_dsv4.compat import finder
            finally:
                self.resolving = False
            return finder.find_spec(name, path, target)

    if not any(getattr(f, "llama_dsv4_alias", None) for f in sys.meta_path):
        sys.meta_path.insert(0, LlamaCppAlias())


_llama_dsv4_alias()
'''


def pth_text() -> str:
    """The .pth file: a comment, and one line that runs HOOK."""
    return (
        "# llama-dsv4: `import llama_cpp` and `python -m llama_cpp.server` run llama-dsv4 in this environment.\n"
        "# Written by `python -m llama_dsv4.compat enable`; `python -m llama_dsv4.compat disable` removes it.\n"
        f"import sys; exec({HOOK!r}, {{'__name__': 'llama_dsv4_compat_pth'}})\n"
    )


def site_dir(user: bool = False, explicit: str | None = None) -> str:
    """Where the .pth goes: --site-dir, the user site-packages with --user, else this environment's."""
    if explicit:
        return explicit
    if user:
        return site.getusersitepackages()
    return sysconfig.get_paths()["purelib"]


def real_llama_cpp() -> str | None:
    """The version of a real llama-cpp-python installed in this environment, if any."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def enable(directory: str) -> str:
    """Write the .pth file into `directory` (made if missing); returns its path. OSError if it cannot be."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PTH_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(pth_text())
    os.replace(tmp, path)  # whole or not at all: a half-written .pth would break every interpreter start
    return path


def disable(directory: str) -> bool:
    """Remove the .pth file from `directory`; False if it was not there."""
    path = os.path.join(directory, PTH_NAME)
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def status(directory: str) -> str:
    path = os.path.join(directory, PTH_NAME)
    if not os.path.exists(path):
        state = f"disabled (no {path})"
    else:
        with open(path, encoding="utf-8") as f:
            current = f.read() == pth_text()
        state = f"enabled ({path}" + ("" if current else "; written by another llama-dsv4: enable again") + ")"
    real = real_llama_cpp()
    if real:
        state += f"\nllama-cpp-python {real} is installed too: " + (
            "the alias wins while enabled (LLAMA_DSV4_COMPAT=0 lets it through for one process)"
            if os.path.exists(path)
            else "`import llama_cpp` imports it"
        )
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llama_dsv4.compat",
        description="Make `import llama_cpp` and `python -m llama_cpp.server` run llama-dsv4 in this Python "
        "environment (enable), stop it (disable), or say which is in effect (status).",
    )
    p.add_argument("action", choices=("enable", "disable", "status"))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="the user site-packages instead of the environment's")
    where.add_argument("--site-dir", help="this site directory instead (one that Python reads .pth files from)")
    args = p.parse_args(argv)
    directory = site_dir(args.user, args.site_dir)
    try:
        if args.action == "enable":
            path = enable(directory)
            print(f"enabled: {path}")
            real = real_llama_cpp()
            if real:
                print(
                    f"note: llama-cpp-python {real} is installed too; the alias wins over it while enabled "
                    "(LLAMA_DSV4_COMPAT=0 lets it through for one process)"
                )
        elif args.action == "disable":
            print(f"disabled: removed {os.path.join(directory, PTH_NAME)}" if disable(directory) else "not enabled")
        else:
            print(status(directory))
    except OSError as e:
        print(
            f"python -m llama_dsv4.compat: error: {directory}: {e.strerror} (try --user, or a virtual environment)",
            file=sys.stderr,
        )
        return 1
    return 0
