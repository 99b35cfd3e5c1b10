"""`LlamaGrammar` (llama-cpp-python's `llama_cpp.llama_grammar`): a GBNF grammar for constrained decoding.

The grammar text is kept here; constrained decoding is implemented by the chat/structured-output work (issue 5).
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"


class LlamaGrammar:
    def __init__(self, *args: object, _grammar: str, **kwargs: object) -> None:
        self._grammar = _grammar
        self._root = LLAMA_GRAMMAR_DEFAULT_ROOT

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        if not isinstance(grammar, str):
            raise TypeError(f"a GBNF grammar is a string, got {type(grammar).__name__}")
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: str | Path, verbose: bool = True) -> LlamaGrammar:
        try:
            with open(file) as f:
                grammar = f.read()
        except Exception as err:
            raise Exception(f"{cls.from_file.__name__}: error reading grammar file: {err}") from err
        if grammar:
            return cls.from_string(grammar, verbose=verbose)
        raise ValueError(f"{cls.from_file.__name__}: error parsing grammar file: params_grammer is empty")

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> LlamaGrammar:
        grammar = cls(_grammar="")
        grammar._json_schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
        return grammar
