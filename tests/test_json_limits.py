"""Structured output that ends (issue 14 item 5, sampling/json_limits.py): objects take no undeclared keys unless the
schema allows them, each part of a number has at most 16 digits, whitespace is bounded, strings are not; through
the grammar state, LlamaGrammar.from_json_schema and create_chat_completion's response_format (the server's:
tests/test_server.py::test_structured_output_ends_through_the_server)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import pytest
from conftest import MICRO

from llama_dsv4 import Llama, LlamaGrammar, LogitsProcessorList
from llama_dsv4.chat import dsml
from llama_dsv4.model.writer import write_model
from llama_dsv4.sampling import constrained
from llama_dsv4.sampling.json_limits import MAX_NUMBER_DIGITS, closed_objects, digit_table, is_json_grammar

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    path = write_model(os.path.join(tmp_path_factory.mktemp("jl"), "small.gguf"), MICRO, dtype="f32", seed=3)[0]
    return Llama(path, n_ctx=1024, verbose=False, n_threads=1, n_threads_batch=1, seed=5)


def accepts(llm: Llama, schema: Any, text: str) -> bool:
    """Whether constrained decoding on `schema` can write `text` (in its tokens) and then end."""
    state = constrained.GrammarState(llm.dsv4_tokenizer, constrained.from_json_schema(schema))
    for t in llm.tokenize(text.encode(), add_bos=False):
        if not state.allowed()[t]:
            return False
        state.accept(t)
    return bool(state.allowed()[llm.token_eos()])


def bias(llm: Llama, which: np.ndarray, by: float) -> LogitsProcessorList:
    """Add `by` to the logits of the tokens `which` marks."""
    add = np.where(which, np.float32(by), np.float32(0))

    def proc(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores + add

    return LogitsProcessorList([proc])


INNER = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
KEYS = [  # (schema, text, can be written)
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a":1}', True),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a":1,"b":2}', False),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"b":2}', False),
    ({"type": "object", "properties": {}}, "{}", True),
    ({"type": "object", "properties": {}}, '{"b":2}', False),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, '{"a":1,"b":[null]}', True),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, '{"a":1,"b":"x"}', True),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, '{"a":1,"b":2}', False),
    ({"type": "object"}, '{"any":{"thing":[1,"x"]}}', True),  # no properties declared: any object
    ({"patternProperties": {"^x_": {"type": "integer"}}}, '{"x_a":1}', True),
    ({"patternProperties": {"^x_": {"type": "integer"}}}, '{"y":1}', False),
    ({"type": "array", "items": INNER}, '[{"a":1},{"a":2}]', True),
    ({"type": "array", "items": INNER}, '[{"a":1,"z":0}]', False),
    # pydantic: a nested model by $ref (with a description beside it), an optional one by anyOf
    ({"$defs": {"I": INNER}, "properties": {"x": {"$ref": "#/$defs/I", "description": "d"}}}, '{"x":{"a":1}}', True),
    (
        {"$defs": {"I": INNER}, "properties": {"x": {"$ref": "#/$defs/I", "description": "d"}}},
        '{"x":{"a":1,"z":0}}',
        False,
    ),
    (
        {"$defs": {"I": INNER}, "properties": {"x": {"anyOf": [{"$ref": "#/$defs/I"}, {"type": "null"}]}}},
        '{"x":null}',
        True,
    ),
    (
        {"$defs": {"I": INNER}, "properties": {"x": {"anyOf": [{"$ref": "#/$defs/I"}, {"type": "null"}]}}},
        '{"x":{"a":1,"z":0}}',
        False,
    ),
    # an object merged from parts takes the keys of all of them
    ({"allOf": [INNER, {"properties": {"b": {"type": "integer"}}}]}, '{"a":1,"b":2}', True),
    ({"allOf": [INNER, {"properties": {"b": {"type": "integer"}}}]}, '{"a":1,"c":2}', False),
    ({"$defs": {"I": INNER}, "$ref": "#/$defs/I", "properties": {"b": {}}}, '{"a":1,"b":2}', True),
    ({"$defs": {"I": INNER}, "$ref": "#/$defs/I", "properties": {"b": {}}}, '{"a":1,"b":2,"c":3}', False),
    ({"properties": {"a": {}, "b": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, '{"b":1}', True),
    ({"properties": {"a": {}, "b": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, '{"b":1,"c":1}', False),
]


@pytest.mark.parametrize(("schema", "text", "ok"), KEYS)
def test_an_undeclared_key_is_impossible_unless_the_schema_allows_it(
    small: Llama, schema: dict, text: str, ok: bool
) -> None:
    assert accepts(small, schema, text) is ok
    if ok:
        jsonschema.validate(json.loads(text), schema)


def test_closed_objects_is_a_copy_and_leaves_what_it_cannot_close_open() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}}}
    before = json.dumps(schema)
    out = closed_objects(schema)
    assert json.dumps(schema) == before
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    # alternatives that declare properties beside the object's own keep the standard's meaning (open); so does
    # what is under a predicate (closing inside `not` would change which values it excludes)
    alternatives = {"properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}, {"properties": {"c": {}}}]}
    assert closed_objects(alternatives) == alternatives
    predicate = {"type": "array", "contains": {"properties": {"a": {}}}}
    assert closed_objects(predicate) == predicate


def test_tool_call_arguments_take_no_undeclared_keys() -> None:
    params = {"type": "object", "properties": {"where": {"type": "object", "properties": {"city": {}}}}}
    grammar = dsml.tools_grammar([{"type": "function", "function": {"name": "f", "parameters": params}}])
    embedded, _ = json.JSONDecoder().raw_decode(grammar.split("%json", 1)[1])
    assert embedded["properties"]["city"] == {} and embedded["additionalProperties"] is False


def digits_after(llm: Llama, schema: dict, prefix: str) -> np.ndarray:
    """Boolean [n_vocab]: which tokens that begin with a digit the grammar allows after `prefix`."""
    state = constrained.GrammarState(llm.dsv4_tokenizer, constrained.from_json_schema(schema))
    for t in llm.tokenize(prefix.encode(), add_bos=False):
        assert state.allowed()[t], prefix
        state.accept(t)
    return state.allowed() & (digit_table(llm.dsv4_tokenizer).lead > 0)


@pytest.mark.parametrize("part", ["", "1.", "-1.5e", "1E+"])
def test_a_seventeenth_digit_is_impossible_in_each_part_of_a_number(small: Llama, part: str) -> None:
    schema = {"type": "object", "properties": {"v": {"type": "number"}, "i": {"type": "integer"}}}
    for key in ("v", "i") if part == "" else ("v",):
        assert digits_after(small, schema, f'{{"{key}":{part}' + "9" * (MAX_NUMBER_DIGITS - 1)).any()
        assert not digits_after(small, schema, f'{{"{key}":{part}' + "9" * MAX_NUMBER_DIGITS).any()
        assert accepts(small, schema, f'{{"{key}":{part}' + "9" * MAX_NUMBER_DIGITS + "}")
        assert not accepts(small, schema, f'{{"{key}":{part}' + "9" * (MAX_NUMBER_DIGITS + 1) + "}")


def test_digits_a_schema_asks_for_and_digits_in_strings_are_kept(small: Llama) -> None:
    big = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 10**17}}}
    assert digits_after(small, big, '{"v":' + "1" * 17).any()  # the schema needs an 18th digit: allowed
    assert accepts(small, big, '{"v":' + "1" * 18 + "}")
    text = {"type": "object", "properties": {"s": {"type": "string"}}}
    assert accepts(small, text, '{"s":"' + "1234567890" * 5 + '"}')


def test_numbers_end_when_the_model_wants_digits(small: Llama) -> None:
    """The model pushed to digits: every part stops at 16, and the answer ends, through response_format and
    LlamaGrammar.from_json_schema."""
    schema = {
        "type": "object",
        "properties": {"i": {"type": "integer"}, "x": {"type": "number"}},
        "required": ["i", "x"],
    }
    digits = bias(small, digit_table(small.dsv4_tokenizer).lead > 0, 30.0)
    for seed in range(3):
        r = small.create_chat_completion(
            [{"role": "user", "content": "JSON"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            logits_processor=digits,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        out = small(
            "JSON:", grammar=LlamaGrammar.from_json_schema(schema), logits_processor=digits, seed=seed, max_tokens=200
        )
        for text, finish in (
            (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]),
            (out["choices"][0]["text"], out["choices"][0]["finish_reason"]),
        ):
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), schema)
            runs = [len(m) for m in re.findall(r"[0-9]+", text)]
            assert max(runs) == MAX_NUMBER_DIGITS, text  # pushed to the bound, not past it


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"a": 1, "b": [1, 2]}', True),
        ('{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}', True),
        ("{\n\t\t" + " " * 18 + '"a":1}', True),
        ("{\n\t\t" + " " * 19 + '"a":1}', False),  # 21 spaces and tabs
        ('{\n\n  "a":1}', False),  # a blank line
        ('{"a":  1}', False),
        (' {"a":1}', False),
        ('{"a":1}\n', False),
    ],
)
def test_whitespace_is_bounded(small: Llama, text: str, ok: bool) -> None:
    schema = {"type": "object", "properties": {"a": {}, "b": {"type": "array"}}}
    assert accepts(small, schema, text) is ok
    compact = {**schema, "x-guidance": {"whitespace_flexible": False}}  # the schema's own choice wins
    assert accepts(small, compact, '{"a": 1}') is False and accepts(small, compact, '{"a":1}')


def test_a_free_string_has_no_bound_and_a_cut_answer_says_length(small: Llama) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    assert accepts(small, schema, '{"s":"' + "long text " * 500 + '"}')
    tok = small.dsv4_tokenizer
    quotes = np.array([b'"' in tok.piece(i) for i in range(tok.n_tokens)])
    r = small.create_chat_completion(
        [{"role": "user", "content": "JSON"}],
        response_format={"type": "json_object", "schema": schema},
        logits_processor=bias(small, quotes, -30.0),
        seed=1,
        max_tokens=40,
    )
    assert r["choices"][0]["finish_reason"] == "length"
    content = r["choices"][0]["message"]["content"]
    assert content.startswith("{") and '"s"' in content


def test_which_grammars_get_the_digit_bound(small: Llama) -> None:
    assert is_json_grammar(constrained.from_json_schema({"type": "object"}))
    assert not is_json_grammar(constrained.from_gbnf('root ::= "1"'))
    assert not is_json_grammar(constrained.from_lark('start: "1"'))
    assert not is_json_grammar("{not json")
