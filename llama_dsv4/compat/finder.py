"""The `llama_cpp` alias and the import hook behind it: `install()` makes the alias modules (llama_cpp,
llama_cpp.llama, llama_cpp.llama_chat_format, ...) out of ours; `import llama_cpp` installs it, and the
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


# ---------------------------------------------------------------------------------------------- the alias

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python API this alias follows


def _module(name: str, *sources: object, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for src in sources:
        for key in getattr(src, "__all__", None) or [k for k in vars(src) if not k.startswith("_")]:
            setattr(mod, key, getattr(src, key))
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def install() -> types.ModuleType:
    """Register llama-dsv4 as `llama_cpp` (and its submodules) in this process; returns the alias module."""
    existing = sys.modules.get("llama_cpp")
    if existing is not None and getattr(existing, "__llama_dsv4__", False):
        return existing
    from .. import cache, grammar, llama, llama_types, sampling, tokenizer
    from . import chat_format, internals, speculative
    from .lowlevel_api import lowlevel_module

    llama_mod = _module(
        "llama_cpp.llama",
        llama_types,
        sampling,
        Llama=llama.Llama,
        LlamaState=llama.LlamaState,
        LlamaGrammar=grammar.LlamaGrammar,
        BaseLlamaCache=cache.BaseLlamaCache,
        LlamaCache=cache.LlamaCache,
        LlamaRAMCache=cache.LlamaRAMCache,
        LlamaDiskCache=cache.LlamaDiskCache,
        BaseLlamaTokenizer=tokenizer.BaseLlamaTokenizer,
        LlamaTokenizer=tokenizer.LlamaTokenizer,
        LlamaDraftModel=speculative.LlamaDraftModel,
    )
    submodules = {
        "llama_cpp.llama": llama_mod,
        "llama_cpp.llama_types": llama_types,
        "llama_cpp.llama_grammar": grammar,
        "llama_cpp.llama_cache": cache,
        "llama_cpp.llama_tokenizer": tokenizer,
        "llama_cpp.llama_speculative": speculative,
        "llama_cpp.llama_chat_format": chat_format,
        "llama_cpp.llama_cpp": (low := lowlevel_module()),
        "llama_cpp._internals": internals,
    }
    root = _module(
        "llama_cpp",
        low,
        llama_mod,
        __version__=LLAMA_CPP_VERSION,
        __llama_dsv4__=True,
        __path__=[],
        __doc__="llama-dsv4 standing in for llama-cpp-python (llama_dsv4.compat)",
    )
    for name, mod in submodules.items():
        setattr(root, name.split(".", 1)[1], mod)
    sys.modules["llama_cpp"] = root
    sys.modules.update(submodules)
    register()  # llama_cpp.server and below: found when first imported (compat/finder.py)
    return root


def uninstall() -> None:
    """Remove the alias (tests use this)."""
    unregister()
    for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
        if name == "llama_cpp" and not getattr(sys.modules[name], "__llama_dsv4__", False):
            return
        del sys.modules[name]
