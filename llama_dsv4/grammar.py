"""`LlamaGrammar` (llama-cpp-python's `llama_cpp.llama_grammar`): a grammar for constrained decoding, from GBNF
(llama.cpp's dialect) or from a JSON schema. Compiled with llguidance and checked when created, so a bad grammar
fails here with a ValueError instead of at sampling time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sampling.grammar_bounds import MAX_GBNF_CHARS

LLAMA_GRAMMAR_DEFAULT_ROOT = "root"

# common grammars, in GBNF
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""
JSON_ARR_GBNF = JSON_GBNF.replace("root   ::= object", "root   ::= array")
LIST_GBNF = r"""
root ::= item+
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"""
ARITHMETIC_GBNF = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"""


class LlamaGrammar:
    """A grammar for constrained decoding (llama-cpp-python's `LlamaGrammar`): pass it as `grammar=` to
    create_completion, create_chat_completion, generate or sample, and the output follows it token by token.

    Make one with `from_string` (GBNF), `from_file` (a GBNF file) or `from_json_schema`; each compiles and checks
    it at once. The constructor is internal.
    """

    def __init__(self, *args: Any, _grammar: str, _compiled: str | None = None, **kwargs: Any) -> None:
        self._grammar = _grammar
        self._root = LLAMA_GRAMMAR_DEFAULT_ROOT
        self._compiled = _compiled

    def _llguidance(self) -> str:
        if self._compiled is None:
            from .sampling import constrained

            self._compiled = constrained.from_gbnf(self._grammar)
        return self._compiled

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        """A grammar in llama.cpp's GBNF dialect (checked now: ValueError when it does not compile or is beyond
        the bounds of llama_dsv4.sampling.grammar_bounds)."""
        if not isinstance(grammar, str):
            raise TypeError(f"a GBNF grammar is a string, got {type(grammar).__name__}")
        g = cls(_grammar=grammar)
        g._llguidance()
        return g

    @classmethod
    def from_file(cls, file: str | Path, verbose: bool = True) -> LlamaGrammar:
        """A grammar from a GBNF file, as from_string; an unreadable file is an Exception naming it, an empty one
        a ValueError."""
        try:
            with open(file) as f:
                grammar = f.read(MAX_GBNF_CHARS + 1)  # one more than allowed: from_string refuses it
        except Exception as err:
            raise Exception(f"{cls.from_file.__name__}: error reading grammar file: {err}") from err
        if grammar:
            return cls.from_string(grammar, verbose=verbose)
        raise ValueError(f"{cls.from_file.__name__}: error parsing grammar file: params_grammer is empty")

    @classmethod
    def from_json_schema(cls, json_schema: str | dict[str, Any], verbose: bool = True) -> LlamaGrammar:
        """Output that validates against a JSON schema ($defs/$ref, anyOf, enums, bounds...); checked now:
        ValueError when it does not compile or is beyond the bounds of llama_dsv4.sampling.grammar_bounds."""
        from .sampling import constrained

        compiled = constrained.from_json_schema(json_schema)  # bounded first: then it is safe to write out
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return cls(_grammar=text, _compiled=compiled)
