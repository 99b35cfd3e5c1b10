"""The embedded demo model: a tiny deepseek4 GGUF with RANDOM weights and the real DeepSeek V4 tokenizer, made by
our writer on first use, so the CLI's main job runs on a fresh machine with no download."""

from __future__ import annotations

import os

from .model.writer import write_model

DEMO_NAME = "llama-dsv4 demo (tiny deepseek4, RANDOM weights)"
_DEMO_FILE = "demo-v1-q8xq5.gguf"  # bump the version when the demo's recipe changes


def cache_dir() -> str:
    base = os.environ.get("LLAMA_DSV4_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-dsv4"
    )
    os.makedirs(base, exist_ok=True)
    return base


def demo_model_path() -> str:
    """Path of the demo model, written (atomically) if it is not there yet."""
    path = os.path.join(cache_dir(), _DEMO_FILE)
    if not os.path.exists(path):
        write_model(path, dtype="q8xq5", vocab="real", seed=2026, name=DEMO_NAME)
    return path
