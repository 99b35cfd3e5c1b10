"""The opt-in `llama_cpp` alias: code written for llama-cpp-python (and LangChain's and LlamaIndex's
integrations, which import the module name `llama_cpp`) runs on llama-dsv4 unchanged.

    import llama_dsv4.compat
    llama_dsv4.compat.install()      # before anything imports llama_cpp
    from llama_cpp import Llama      # -> llama_dsv4.Llama

or `import llama_dsv4.as_llama_cpp`, which installs it. The alias wins over a real llama-cpp-python installed in
the same environment (it only changes `sys.modules` and `sys.meta_path` of this process). For every process of an
environment, `python -m llama_cpp.server` included: `python -m llama_dsv4.compat enable` (enable.py).
"""

from __future__ import annotations

import sys
import types

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
    from .finder import register

    register()  # llama_cpp.server and below: found when first imported (compat/finder.py)
    return root


def uninstall() -> None:
    """Remove the alias (tests use this)."""
    from . import finder

    finder.unregister()
    for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
        if name == "llama_cpp" and not getattr(sys.modules[name], "__llama_dsv4__", False):
            return
        del sys.modules[name]
