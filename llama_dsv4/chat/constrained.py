"""Constrained decoding (grammars, JSON schemas): the chat/structured-output work (issue 5) implements it."""

from __future__ import annotations

from typing import Any


def grammar_state(llama: Any, grammar: Any) -> Any:
    raise NotImplementedError("grammar-constrained decoding is not implemented yet in llama-dsv4")
