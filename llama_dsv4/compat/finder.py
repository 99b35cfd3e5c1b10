"""The import hook behind the `llama_cpp` alias: `import llama_cpp` installs the alias (compat.install) and the
modules that would be costly to make up front (`llama_cpp.server` and below, which import FastAPI when used) are
found here when first imported, so `python -m llama_cpp.server` runs llama-dsv4's server.

`install()` puts a `LlamaCppFinder` first on sys.meta_path for its process; `python -m llama_dsv4.compat enable`
puts one there in every process of an environment (see enable.py), before any other finder, so the alias wins
over a real llama-cpp-python installed beside it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

ROOT = "llama_cpp"
# alias packages whose modules are ours, module for module: llama_cpp.server.X is llama_dsv4.compat.server.X
PACKAGES = {"llama_cpp.server": "llama_dsv4.compat.server"}
MARK = "llama_dsv4_alias"  # an attribute of our finders on sys.meta_path (the .pth one is another class)


def target_of(name: str) -> str | None:
    """The llama-dsv4 module an alias module name stands for (None: not one of ours)."""
    for alias, ours in PACKAGES.items():
        if name == alias or name.startswith(alias + "."):
            return ours + name[len(alias) :]
    return None


class _AliasLoader:
    """Loads an alias module by importing ours and putting it in sys.modules under the alias name (ours keeps
    its own name and spec); `get_code` serves runpy (`python -m llama_cpp.server`)."""

    def __init__(self, target: str | None) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if self.target is None:  # the root: the alias itself
            from . import install

            install()
            return
        sys.modules[module.__name__] = importlib.import_module(self.target)

    def get_code(self, name: str) -> Any:
        spec = importlib.util.find_spec(self.target or "")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            raise ImportError(f"no code for {name}", name=name)
        return spec.loader.get_code(spec.name)

    def is_package(self, name: str) -> bool:
        spec = importlib.util.find_spec(self.target) if self.target else None
        return self.target is None or (spec is not None and spec.submodule_search_locations is not None)


def find_spec(name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
    """The spec of alias module `name`, or None where it is not ours (the import goes on to the other finders)."""
    if name == ROOT:
        return importlib.machinery.ModuleSpec(ROOT, _AliasLoader(None), origin="llama-dsv4 alias", is_package=True)
    root = sys.modules.get(ROOT)
    ours = target_of(name)
    if ours is None or root is None or not getattr(root, "__llama_dsv4__", False):
        return None  # not ours, or a real llama-cpp-python is the one imported in this process
    found = importlib.util.find_spec(ours)
    if found is None:
        return None
    return importlib.machinery.ModuleSpec(
        name, _AliasLoader(ours), origin=found.origin, is_package=found.submodule_search_locations is not None
    )


class LlamaCppFinder:
    """A sys.meta_path finder for `llama_cpp` and `llama_cpp.*` (see the module's docstring)."""

    llama_dsv4_alias = "install"

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != ROOT and not name.startswith(ROOT + "."):
            return None
        return find_spec(name, path, target)


def registered() -> list[Any]:
    """Our finders on sys.meta_path (this module's, and the one `enable` installs from a .pth file)."""
    return [f for f in sys.meta_path if getattr(f, MARK, None)]


def register() -> None:
    """Put a LlamaCppFinder first on sys.meta_path unless one of ours is there."""
    if not registered():
        sys.meta_path.insert(0, LlamaCppFinder())


def unregister() -> None:
    """Remove the finder `register` added (the .pth one of an enabled environment stays)."""
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, MARK, None) != "install"]
