"""Structured output that ends: llama.cpp's pragmatic choices for JSON-schema grammars, over llguidance.

llguidance compiles a JSON schema as the JSON Schema standard reads it: an object schema without
`additionalProperties` takes any other key, and a number any count of digits. A model that does not know when to
stop (a random-weight one; a trained one that rambles) then writes keys or digits until `max_tokens`, and the
answer does not parse. llama.cpp's converter (common/json-schema.cpp, json-schema-to-grammar.cpp) closes both, and
so does this module:

- objects (`closed_objects`): a schema that declares `properties` (or `patternProperties`) takes no other key
  unless its `additionalProperties` says so (`true` or a schema); `{"type": "object"}` alone is still any object.
  Objects merged from parts (`allOf`, a `$ref` with sibling keywords) take the keys of all their parts and no
  others. Left open (as the standard reads them) are: alternatives (`anyOf` / `oneOf`) that declare properties
  beside an object's own (llama.cpp drops the object's own there), and anything under `not`, `if`, `contains`,
  `propertyNames` and `dependentSchemas`;
- numbers (`NumberDigits`): at most MAX_NUMBER_DIGITS (16) digits in each part of a number: the integer part,
  the fraction, the exponent (llama.cpp's `integral-part` and `decimal-part`). A schema cannot say this to
  llguidance (its number rule has no digit bound, and `minimum` / `maximum` bound only the integer part), so
  it is applied to the mask, following the text to know where a number is (outside strings); where the grammar
  allows nothing else (a schema whose `minimum` has 18 digits) its own mask stands. Only grammars that are one
  JSON schema get it (response_format, LlamaGrammar.from_json_schema), not the JSON inside tool-call markup;
- whitespace (WHITESPACE): wherever JSON allows whitespace between tokens, nothing, one space, or a newline and
  up to 20 spaces or tabs: indented JSON as models write it; none before the value or after it. llama.cpp's
  `space` rule also allows a blank line (two newlines), which no model writes inside JSON and a random model
  spends its tokens on (on the real vocabulary it took one of the 50 schemas of the tests past 200 tokens);
- strings: no bound on their length, as in llama.cpp: a bound that a trained model never notices (long text in
  a JSON field is ordinary) does not end a random model's string either (measured at max_tokens 200: 1 free
  string in 20 closed with the real vocabulary, 10 in 20 with a 512-token one), so a `maxLength` is the
  schema's to give. An answer cut by `max_tokens` ends with `finish_reason: "length"`, as OpenAI's does.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .grammar_bounds import MAX_SCHEMA_CHARS, GrammarError, resolve_refs

if TYPE_CHECKING:
    from ..tokenizer import DSV4Tokenizer

MAX_NUMBER_DIGITS = 16  # digits in each part of a JSON number (llama.cpp: [1-9] [0-9]{0,15}, [0-9]{1,16})
WHITESPACE = r" |\n[ \t]{0,20}"  # llama.cpp's SPACE_RULE less its blank line (llguidance makes it optional)

# ------------------------------------------------------------------------------------------------ objects

_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> subschema
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")  # lists of subschemas (`items`: before 2020-12)
_ONE = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "contains")
_ONE += ("not", "if", "then", "else", "propertyNames")  # one subschema
_OBJECT_KEYS = frozenset(
    {"properties", "patternProperties", "additionalProperties", "unevaluatedProperties", "required"}
    | {"propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas"}
)
_OPENING = ("additionalProperties", "unevaluatedProperties", "patternProperties", "dependentSchemas")
_JOINED = ("allOf", "$ref", "then", "else", "anyOf", "oneOf")  # parts applied to the same object as their holder
_BRANCHES = ("anyOf", "oneOf")  # ... as alternatives
_FROZEN = ("not", "if", "contains", "propertyNames", "dependentSchemas")  # predicates: their meaning must stay


def _subschemas(node: dict[str, Any], target: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(keyword, subschema) of each subschema directly in `node`; `target` is what its $ref names."""
    for k, v in node.items():
        if k in _MAPS and isinstance(v, dict):
            yield from ((k, s) for s in v.values() if isinstance(s, dict))
        elif k in _LISTS and isinstance(v, list):
            yield from ((k, s) for s in v if isinstance(s, dict))
        elif k in _ONE and isinstance(v, dict):
            yield k, v
    if isinstance(target, dict):
        yield "$ref", target


Parts = dict[int, list[tuple[str, dict[str, Any]]]]


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` (within grammar_bounds' bounds) whose object schemas take no keys but those they declare
    unless they say otherwise (see the module's text); `schema` itself is not changed."""
    try:
        schema = json.loads(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise GrammarError(f"the JSON schema is not JSON: {e}") from None
    _, ref_of = resolve_refs(schema)
    # 1. every subschema, reached from the root through subschema keywords and $refs
    nodes: dict[int, dict[str, Any]] = {}
    parts: Parts = {}
    work = [schema]
    while work:
        node = work.pop()
        if id(node) not in nodes:
            nodes[id(node)] = node
            parts[id(node)] = list(_subschemas(node, ref_of.get(id(node))))
            work.extend(s for _, s in parts[id(node)])
    # 2. what stays as it is: what is under a predicate (frozen), and the parts of an object that has other parts
    # or keywords beside them (merged: that object is closed instead, with the keys of all its parts)
    frozen = {id(s) for n in nodes.values() for k, s in parts[id(n)] if k in _FROZEN}
    merged: set[int] = set()
    for n in nodes.values():
        applied = [k for k in ("allOf", "$ref", *_BRANCHES) if k in n]
        alone = not (_OBJECT_KEYS & n.keys()) and len(applied) == 1 and len(n.get("allOf", ())) <= 1
        merged.update(id(s) for k, s in parts[id(n)] if k in _JOINED and not (alone and k in applied))
    for marked, through in ((frozen, None), (merged, _JOINED)):
        todo = list(marked)
        while todo:
            for k, s in parts[todo.pop()]:
                if (through is None or k in through) and id(s) not in marked:
                    marked.add(id(s))
                    todo.append(id(s))
    # 3. close each object that is neither, with the keys of its merged parts
    budget = [MAX_SCHEMA_CHARS]  # parts visited and characters of keys written: parts can be shared many times over
    for n in nodes.values():
        if id(n) in frozen or id(n) in merged or any(k in n for k in _OPENING if k != "patternProperties"):
            continue
        keys = _keys_of_parts(n, parts, merged, budget)
        if keys is None or not (keys or "properties" in n or "patternProperties" in n):
            continue
        if keys:
            props = n.get("properties")
            props = props if isinstance(props, dict) else {}
            n["properties"] = {**props, **{k: True for k in keys if k not in props}}
        n["additionalProperties"] = False
    return schema


def with_limits(schema: dict[str, Any]) -> dict[str, Any]:
    """What llguidance compiles for a JSON schema (within grammar_bounds' bounds): a copy, its objects closed
    (closed_objects) and llama.cpp's whitespace unless the schema's own "x-guidance" sets whitespace."""
    schema = closed_objects(schema)
    options = schema.get("x-guidance")
    if options is None:
        schema["x-guidance"] = {"whitespace_pattern": WHITESPACE}
    elif isinstance(options, dict) and not {"whitespace_pattern", "whitespace_flexible"} & options.keys():
        options["whitespace_pattern"] = WHITESPACE
    return schema


def _keys_of_parts(node: dict[str, Any], parts: Parts, merged: set[int], budget: list[int]) -> list[str] | None:
    """The property names that the merged parts of `node` declare, in order; None when a part says which keys it
    takes (additionalProperties ...), an alternative declares properties, or the budget is spent."""
    keys: dict[str, None] = {}
    seen = {id(node)}
    work = [(k in _BRANCHES, s) for k, s in reversed(parts[id(node)]) if k in _JOINED and id(s) in merged]
    while work:
        branch, part = work.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        budget[0] -= 1
        if any(k in part for k in _OPENING) or budget[0] < 0:
            return None
        props = part.get("properties")
        if isinstance(props, dict) and props:
            if branch:
                return None
            for name in props:
                budget[0] -= len(name) + 8
                keys[name] = None
            if budget[0] < 0:
                return None
        work.extend((branch or k in _BRANCHES, s) for k, s in reversed(parts[id(part)]) if k in _JOINED)
    return list(keys)


# ------------------------------------------------------------------------------------------------ numbers


class DigitTable:
    """Per token of a vocabulary: the digits it adds to a number part it continues (`lead`: its leading ASCII
    digits) or starts (`signed`: the same after a leading sign)."""

    def __init__(self, tok: DSV4Tokenizer) -> None:
        n = tok.n_tokens
        self.lead = np.zeros(n, np.int32)
        self.signed = np.zeros(n, np.int32)
        for i in range(n):
            piece = tok.piece(i)
            if not piece:
                continue
            d = _leading_digits(piece)
            self.lead[i] = d
            self.signed[i] = _leading_digits(piece[1:]) if piece[0] in b"+-" else d
        self.most = int(max(self.lead.max(initial=0), self.signed.max(initial=0)))


def _leading_digits(b: bytes) -> int:
    n = 0
    while n < len(b) and 0x30 <= b[n] <= 0x39:
        n += 1
    return n


_tables: weakref.WeakKeyDictionary[Any, DigitTable] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def digit_table(tok: DSV4Tokenizer) -> DigitTable:
    """The DigitTable of a tokenizer, built once (a fraction of a second for 129k tokens)."""
    with _tables_lock:
        t = _tables.get(tok)
        if t is None:
            t = _tables[tok] = DigitTable(tok)
        return t


def is_json_grammar(grammar: str) -> bool:
    """Whether an llguidance grammar is a JSON schema's (from LLMatcher.grammar_from_json_schema) and nothing
    else: its whole output is one JSON value."""
    if not grammar.lstrip().startswith("{"):  # a lark grammar
        return False
    try:
        spec = json.loads(grammar)
    except ValueError:
        return False
    g = spec.get("grammars") if isinstance(spec, dict) else None
    return (
        isinstance(g, list)
        and len(g) == 1
        and isinstance(g[0], dict)
        and g[0].get("json_schema") is not None
        and not g[0].get("lark_grammar")
    )


class NumberDigits:
    """Follows a JSON text token by token and keeps each part of its numbers within MAX_NUMBER_DIGITS digits.
    A token counts for the part it continues or starts; digits it has after a `.` or `e` of its own are not
    counted (vocabularies have no such long tokens, and each is bounded by the token's length anyway)."""

    def __init__(self, table: DigitTable) -> None:
        self.table = table
        self.in_string = False
        self.escaped = False
        self.digits = -1  # digits so far in the current number part; -1: not in a number

    def restrict(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` less the tokens that would put a 17th digit into a number part, unless that leaves none."""
        if self.in_string:
            return allowed
        t = self.table
        room = MAX_NUMBER_DIGITS - max(self.digits, 0)
        digits = t.lead if self.digits > 0 else t.signed  # continuing a part, or starting one (after a sign)
        if room >= t.most:  # no token has that many
            return allowed
        kept = allowed & (digits <= room)
        return kept if kept.any() else allowed

    def advance(self, piece: bytes) -> None:
        """Follow the text by the bytes of one more token."""
        for c in piece:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == 0x5C:  # backslash
                    self.escaped = True
                elif c == 0x22:  # quote
                    self.in_string = False
                continue
            if self.digits >= 0:  # in a number: -12.5e+3
                if 0x30 <= c <= 0x39:
                    self.digits += 1
                    continue
                if c in b".eE":  # a new part
                    self.digits = 0
                    continue
                if c in b"+-":  # the exponent's sign
                    continue
                self.digits = -1
            if c == 0x22:
                self.in_string = True
            elif c == 0x2D or 0x30 <= c <= 0x39:
                self.digits = int(c != 0x2D)
