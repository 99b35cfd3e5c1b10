"""Importing this module installs the `llama_cpp` alias (see llama_dsv4.compat)."""

from .compat import install

install()
