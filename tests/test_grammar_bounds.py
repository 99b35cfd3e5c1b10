"""Grammars and JSON schemas that once killed the process (llguidance's compiler overflowed the native stack:
SIGSEGV) or cost minutes: refused with a ValueError naming the bound, before they reach the compiler; real ones
keep compiling. Crash cases run in a child process, whose exit status is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import hostile_grammars as hg
import pytest

from llama_dsv4 import LlamaGrammar
from llama_dsv4.chat import dsml
from llama_dsv4.grammar import ARITHMETIC_GBNF, JSON_GBNF, LIST_GBNF
from llama_dsv4.sampling.grammar_bounds import (
    MAX_DEPTH,
    MAX_GBNF_CHARS,
    MAX_GBNF_RULES,
    MAX_SCHEMA_CHARS,
    check_gbnf,
    check_json_schema,
    clean_message,
    longest_path,
)

TESTS = os.path.dirname(os.path.abspath(__file__))

# (what, a call of tests/hostile_grammars.py, what the refusal must name); each of these crashed, or took minutes
HOSTILE = [
    ("schema", "ref_chain(3000)", f"at most {MAX_DEPTH}"),
    ("schema", "object_chain(1000)", f"at most {MAX_DEPTH}"),
    ("schema", "ref_cycle(5000)", f"at most {MAX_DEPTH}"),
    ("schema", "json.dumps(ref_chain(3000))", f"at most {MAX_DEPTH}"),
    ("schema", "nested_text(3000)", f"at most {MAX_DEPTH}"),
    ("schema", "nested(5000)", f"at most {MAX_DEPTH}"),
    ("schema", "self_containing()", f"at most {MAX_DEPTH}"),
    ("schema", "{'enum': ['x' * 100] * 20000}", f"larger than {MAX_SCHEMA_CHARS}"),
    ("gbnf", "gbnf_chain(4000)", f"at most {MAX_DEPTH}"),
    ("gbnf", "gbnf_chain(300)", f"at most {MAX_DEPTH}"),
    ("gbnf", "gbnf_alternation(100000)", f"longer than {MAX_GBNF_CHARS}"),
    ("gbnf", "gbnf_parens(300)", f"at most {MAX_DEPTH}"),
    ("gbnf", "gbnf_rules(5000)", f"more than {MAX_GBNF_RULES} rules"),
]

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from hostile_grammars import *
    from llama_dsv4 import LlamaGrammar
    for kind, expr in json.loads(sys.stdin.read()):
        value = eval(expr)
        try:
            if kind == "gbnf":
                LlamaGrammar.from_string(value)
            else:
                LlamaGrammar.from_json_schema(value)
            out = ["compiled", ""]
        except ValueError as e:
            out = ["ValueError", str(e)]
        except BaseException as e:
            out = [type(e).__name__, str(e)[:300]]
        print(json.dumps(out), flush=True)
    """
)


def test_hostile_grammars_are_refused_without_killing_the_process() -> None:
    cases = [(kind, expr) for kind, expr, _ in HOSTILE]
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, TESTS], input=json.dumps(cases), capture_output=True, text=True, timeout=300
    )
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0, f"the process died ({p.returncode}) after {len(results)} cases: {p.stderr[-2000:]}"
    assert len(results) == len(HOSTILE)
    for (_, expr, bound), (outcome, message) in zip(HOSTILE, results, strict=True):
        assert outcome == "ValueError" and bound in message, (expr, outcome, message)
        assert "\n" not in message and len(message) < 400, message


def test_the_compiler_runs_on_a_large_stack() -> None:
    """Beyond the bounds (lifted here), a chain that overflows an 8 MiB stack (~920 levels) still compiles: the
    compile thread's 64 MiB give the bounds their margin."""
    child = textwrap.dedent(
        """
        import sys, threading
        sys.path.insert(0, sys.argv[1])
        from hostile_grammars import object_chain
        import llama_dsv4.sampling.grammar_bounds as bounds
        from llama_dsv4.sampling import constrained
        bounds.MAX_DEPTH = 10**9
        threading.stack_size(8 << 20)  # an ordinary thread's stack, as the server's slots have
        t = threading.Thread(target=constrained.from_json_schema, args=(object_chain(1500),))
        t.start()
        t.join()
        print("compiled")
        """
    )
    p = subprocess.run([sys.executable, "-c", child, TESTS], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "compiled" in p.stdout, (p.returncode, p.stderr[-2000:])


def test_the_depth_bound_counts_references_nesting_and_cycles() -> None:
    assert check_json_schema(hg.object_chain(84)) > 0  # 3 levels per link: 255 in all
    with pytest.raises(ValueError, match="nests 258 levels deep"):
        check_json_schema(hg.object_chain(85))
    check_json_schema(hg.ref_cycle(63))  # a cycle counts once round: 4 levels per member
    with pytest.raises(ValueError, match="nests 257 levels"):
        check_json_schema(hg.ref_cycle(64))
    check_gbnf(hg.gbnf_chain(254))
    with pytest.raises(ValueError, match="nests 257 levels"):
        check_gbnf(hg.gbnf_chain(255))
    # strongly connected parts count as the sum of their members; the rest as the deepest path
    local = {"a": 2, "b": 3, "c": 1, "d": 5}
    best = longest_path(local, {"a": [(1, "b")], "b": [(2, "c"), (1, "a")], "d": [(4, "c")]})  # type: ignore[arg-type]
    assert best == {"a": 6, "b": 6, "c": 1, "d": 5}


def test_real_schemas_and_grammars_compile() -> None:
    # a pydantic-style model: nested models in $defs, a recursive tree, mutual recursion, lists and unions
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["name"],
            },
            "Expr": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/Sum"}]},
            "Sum": {"type": "object", "properties": {"terms": {"type": "array", "items": {"$ref": "#/$defs/Expr"}}}},
            "Address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
        },
        "type": "object",
        "properties": {
            "tree": {"$ref": "#/$defs/Node"},
            "expr": {"$ref": "#/$defs/Expr"},
            "home": {"$ref": "#/$defs/Address"},
            "work": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
            "same": {"$ref": "#/properties/home"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        },
        "required": ["tree", "expr"],
    }
    deep = {"type": "string"}
    for _ in range(30):  # 30 levels of objects: beyond OpenAI's limit of 10
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    by_id = {"$id": "http://example.com/s", "$defs": {"a": {"$anchor": "A", "type": "integer"}}, "$ref": "#A"}
    for s in (schema, deep, by_id, {"$ref": "http://example.com/s#/$defs/a", **by_id}, {"$ref": "#"}, True):
        assert LlamaGrammar.from_json_schema(s if s is not True else {}) is not None
    for g in (JSON_GBNF, ARITHMETIC_GBNF, LIST_GBNF):
        assert LlamaGrammar.from_string(g) is not None


def test_refs_outside_the_schema_are_refused() -> None:
    for ref in ("#/$defs/missing", "http://elsewhere.example/schema.json", "#nowhere", "other.json#/a"):
        with pytest.raises(ValueError, match="does not name a subschema"):
            LlamaGrammar.from_json_schema({"$defs": {"a": {"type": "string"}}, "$ref": ref})


def test_tool_schemas_are_bounded_too() -> None:
    def tool(params: dict) -> list[dict]:
        return [{"type": "function", "function": {"name": "f", "parameters": params}}]

    deep = hg.object_chain(1000)
    with pytest.raises(ValueError, match=f"at most {MAX_DEPTH}"):
        dsml.tools_grammar(tool({"type": "object", "properties": {"p": deep["$defs"]["d0"]}, "$defs": deep["$defs"]}))
    # $defs are copied into every parameter's schema: many parameters times large $defs is refused, not built
    defs = {f"d{i}": {"type": "string", "description": "x" * 1000} for i in range(100)}
    params = {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/d0"} for i in range(100)}, "$defs": defs}
    with pytest.raises(ValueError, match=f"more than {MAX_SCHEMA_CHARS} characters"):
        dsml.tools_grammar(tool(params))


def test_compiler_messages_reach_clients_cleaned() -> None:
    panic = (
        "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n<backtrace>\n   0: <unknown>\n"
        "  16: type_call\n             at /tmp/python-build/Python-3.11.7/Objects/typeobject.c:1091:11\n"
    )
    assert clean_message(panic) == "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10"
    assert clean_message("error at /home/u/.cargo/registry/src/llguidance-1.9/src/earley/parser.rs:120:5 here") == (
        "error at <path> here"
    )
    assert len(clean_message("x" * 5000)) == 300 and clean_message("\n\n") == "unknown error"
    with pytest.raises(ValueError) as e:  # a real message from the compiler: one line, with what went wrong
        LlamaGrammar.from_string('root ::= "a" {')
    assert "\n" not in str(e.value) and "invalid" in str(e.value)


def test_a_grammar_file_is_read_only_up_to_the_bound(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "big.gbnf")
    with open(path, "w") as f:
        f.write('root ::= "a"\n' + "# a comment\n" * 1_000_000)  # 12 MB
    with pytest.raises(ValueError, match=f"longer than {MAX_GBNF_CHARS}"):
        LlamaGrammar.from_file(path)
