"""Builders of the grammars and JSON schemas that crashed llguidance's compiler or took minutes (for
tests/test_grammar_bounds.py and tests/test_server.py, and the child processes they start)."""

from __future__ import annotations

from typing import Any


def ref_chain(n: int) -> dict[str, Any]:
    """{"$ref": d0}, d0 = {"$ref": d1}, ... (SIGSEGV from ~2,500 on an 8 MiB stack)."""
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def object_chain(n: int) -> dict[str, Any]:
    """Each definition an object whose property is the next one (SIGSEGV from ~920)."""
    defs: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)
    }
    defs[f"d{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def ref_cycle(n: int) -> dict[str, Any]:
    """d0 -> d1 -> ... -> d(n-1) -> d0, each an object (SIGSEGV at 5,000)."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{(i + 1) % n}"}}} for i in range(n)}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def nested(n: int) -> dict[str, Any]:
    """Objects nested n deep, as a Python dict."""
    s: dict[str, Any] = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"a": s}}
    return s


def nested_text(n: int) -> str:
    """Objects nested n deep, as JSON text."""
    return '{"type":"object","properties":{"a":' * n + '{"type":"string"}' + "}}" * n


def self_containing() -> dict[str, Any]:
    """A Python dict that holds itself (no JSON text can say that)."""
    d: dict[str, Any] = {"type": "object"}
    d["properties"] = {"a": d}
    return d


def gbnf_chain(n: int) -> str:
    """root ::= r0, r0 ::= r1, ... (SIGSEGV from ~3,500 rules)."""
    return "root ::= r0\n" + "".join(f"r{i}::=r{i + 1}\n" for i in range(n)) + f'r{n} ::= "b"\n'


def gbnf_alternation(n: int) -> str:
    """One rule of n alternatives (100,000: 18 s, then a Rust panic with its backtrace)."""
    return "root ::= " + " | ".join(f'"w{i}"' for i in range(n)) + "\n"


def gbnf_parens(n: int) -> str:
    return "root ::= " + "(" * n + '"a"' + ")" * n + "\n"


def gbnf_rules(n: int) -> str:
    return "root ::= r0\n" + "".join(f'r{i}::="a"\n' for i in range(n))
