"""The chat package's own templates, kept here as data files (packaged by pyproject.toml's package-data)."""

from __future__ import annotations

from importlib import resources


def default_chat_template() -> str:
    """Our DeepSeek V4 chat template (deepseek_v4.jinja here; docs/architecture.md §14.3): the "deepseek-v4" chat
    format, and the template the model writer embeds in the files it writes."""
    return resources.files(__name__).joinpath("deepseek_v4.jinja").read_text(encoding="utf-8")
