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

from .finder import LLAMA_CPP_VERSION, install, uninstall

__all__ = ["LLAMA_CPP_VERSION", "install", "uninstall"]
