"""The compiled extensions, imported before the rest of the package (llama_dsv4/__init__.py imports this module
first), so that a source tree without them, such as a fresh clone imported from its root, says what to do instead of
failing deep inside with a misleading "circular import"."""

from __future__ import annotations

import importlib
import os

PACKAGE = __name__.rpartition(".")[0]
EXTENSIONS = ("_ggml", "engine.graph", "engine.context")  # built by setup.py from the .pyx files


def require() -> None:
    """Import each extension; raise an ImportError that says how to build them when one is missing."""
    for name in EXTENSIONS:
        module = f"{PACKAGE}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            where = os.path.dirname(os.path.abspath(__file__))
            raise ImportError(
                f"{PACKAGE} at {where} has no compiled extension {module}: this is a source tree that was not "
                "built. Install the package (`pip install .`) and import it from outside the source tree, or build "
                "it in place (`pip install -e .`, or `python setup.py build_ext --inplace` with Cython and "
                "libggml-python==0.20.2.post1 installed)."
            ) from None


require()
