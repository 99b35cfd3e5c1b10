"""The module the alias installs as `llama_cpp.llama_cpp`: constants, ctypes types and low-level functions
(constants.py, lowlevel_types.py, lowlevel*.py) in one namespace, as upstream's."""

from __future__ import annotations

import ctypes
import functools
import types

from . import constants, lowlevel, lowlevel_context, lowlevel_model, lowlevel_sampler, lowlevel_types


@functools.cache
def lowlevel_module() -> types.ModuleType:
    mod = types.ModuleType("llama_cpp.llama_cpp", "llama-dsv4's low-level API (llama_dsv4.compat.lowlevel)")
    for src in (constants, lowlevel_types, lowlevel, lowlevel_model, lowlevel_context, lowlevel_sampler):
        names = getattr(src, "__all__", None) or [k for k in vars(src) if not k.startswith("_")]
        for key in names:
            value = getattr(src, key)
            if not isinstance(value, types.ModuleType) and key != "annotations":
                setattr(mod, key, value)
    mod.ctypes = ctypes
    mod._lib = lowlevel_model._lib
    return mod
