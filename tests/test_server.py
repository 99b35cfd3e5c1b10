"""llama-dsv4-server: the real server in a subprocess on 127.0.0.1, driven by the official openai client and
LangChain's ChatOpenAI; a bounded load test (concurrent streams, early disconnects, memory back to its baseline);
malformed requests; the API key; /metrics; the model card's command line, parsed and started.

Outputs are made deterministic with logit_bias: a request biased towards one word's token at temperature 0 answers
that word, max_tokens times, whatever the random weights say, so a stream that got another client's tokens, or
lost some, shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import hostile_grammars as hg
import pytest
from conftest import WEATHER

from llama_dsv4 import flags as flags_mod
from llama_dsv4.server.settings import Settings, SettingsError, parse_args

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

KEY = "sk-test-key"
ALIAS = "dsv4-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = (" alpha", " delta", " echo", " golf", " hotel", " kilo", " november", " apple", " house", " river")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m llama_dsv4.server ...` (or `command ...`, in `environ`) on 127.0.0.1 and a free port; stopped with
    SIGINT (must exit 0)."""

    def __init__(
        self,
        args: list[str],
        log_path: str,
        home: str | None = None,
        command: list[str] | None = None,
        environ: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**(os.environ if environ is None else environ), "PYTHONUNBUFFERED": "1"}
        if home is not None:  # MoE residency keeps its statistics under ~/.llama by default
            env["HOME"] = home
        self.proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "llama_dsv4.server"]),
                *args,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not start:\n{self.log()}")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(model: str, log: str, *extra: str) -> Server:
    """A server on the model with the test suite's common flags (4096 positions, 2 slots, 1 thread, KEY), ready."""
    srv = Server(["-m", model, "-c", "4096", "-np", "2", "-t", "1", "--api-key", KEY, *extra], log)
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def server(real_vocab_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = start_server(real_vocab_path, log, "--alias", ALIAS, "--max-body-mib", "1")
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()  # a clean shutdown on SIGINT


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def word_tokens(server: Server) -> dict[str, int]:
    """Words that are one token each, with their ids (from the server's /tokenize)."""
    out = {}
    for w in WORDS:
        ids = httpx.post(server.url + "/tokenize", json={"content": w}, headers=AUTH).json()["tokens"]
        if len(ids) == 1:
            out[w] = ids[0]
    assert len(out) >= 6
    return out


def metrics_of(server: Server) -> dict[str, float]:
    """/metrics parsed with prometheus_client's parser: {'name{label=value,...}': value}."""
    parser = pytest.importorskip("prometheus_client.parser")
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in parser.text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def error_of(r: Any) -> dict[str, Any]:
    """The OpenAI error object of a 4xx response (checked for shape)."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "param" in err and "code" in err
    return err


# ---------------------------------------------------------------------------------------------- the openai client


def test_models_and_chat_with_the_openai_client(client: Any, word_tokens: dict[str, int]) -> None:
    assert [m.id for m in client.models.list().data] == [ALIAS]
    word, tok = next(iter(word_tokens.items()))
    ask: dict[str, Any] = dict(
        model=ALIAS,
        messages=[{"role": "user", "content": "Say a word."}],
        max_tokens=5,
        temperature=0,
        logit_bias={str(tok): 100},
    )
    r = client.chat.completions.create(**ask)
    assert r.model == ALIAS and r.object == "chat.completion"
    assert r.choices[0].message.content == word * 5 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0

    # the same request streamed: the same text, role first, finish last, usage at the end when asked
    stream = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == word * 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1

    # unbiased greedy text is the same streamed and whole
    msgs = [{"role": "user", "content": "Tell me something."}]
    whole = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=8, temperature=0)
    parts = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == whole.choices[0].message.content


def test_text_completions_and_reasoning(client: Any, word_tokens: dict[str, int]) -> None:
    (w1, t1), (w2, t2) = list(word_tokens.items())[1:3]
    text: dict[str, Any] = dict(model=ALIAS, prompt="Once upon a time,", max_tokens=4, temperature=0)
    r = client.completions.create(**text, logit_bias={str(t1): 100})
    assert r.choices[0].text == w1 * 4 and r.usage.completion_tokens == 4
    s = client.completions.create(**text, logit_bias={str(t1): 100}, stream=True)
    assert "".join(c.choices[0].text for c in s) == w1 * 4
    # thinking on: the (unfinished) thinking comes back as reasoning_content, not as content
    think: dict[str, Any] = dict(
        model=ALIAS, messages=[{"role": "user", "content": "Think."}], max_tokens=3, temperature=0
    )
    r = client.chat.completions.create(
        **think, logit_bias={str(t2): 100}, extra_body={"chat_template_kwargs": {"thinking": True}}
    )
    msg = r.choices[0].message
    assert msg.reasoning_content == w2 * 3 and not msg.content
    s = client.chat.completions.create(
        **think, logit_bias={str(t2): 100}, extra_body={"thinking": {"type": "enabled"}}, stream=True
    )
    chunks = list(s)
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == w2 * 3


def test_tools_and_structured_output(client: Any) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "Weather in Paris for two days?"}]
    r = client.chat.completions.create(
        model=ALIAS, messages=msgs, tools=[WEATHER], tool_choice=named, temperature=0.8, seed=3, max_tokens=200
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    s = client.chat.completions.create(
        model=ALIAS,
        messages=msgs,
        tools=[WEATHER],
        tool_choice=named,
        temperature=0.8,
        seed=3,
        max_tokens=200,
        stream=True,
    )
    chunks = list(s)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(call.function.arguments)  # same seed, same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the tool's answer goes back in the conversation (arguments as a JSON string, as OpenAI clients send them)
    follow = [
        *msgs,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r2 = client.chat.completions.create(model=ALIAS, messages=follow, max_tokens=3, temperature=0)
    assert r2.choices[0].finish_reason in ("length", "stop")

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        temperature=0.8,
        seed=1,
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(  # llama-cpp-python's spelling: json_object with a schema
        model=ALIAS,
        messages=[{"role": "user", "content": "JSON please."}],
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
        temperature=0.8,
        seed=2,
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_structured_output_ends_through_the_server(client: Any) -> None:
    """Issue 14 item 5: a schema as pydantic writes it (no additionalProperties, numbers without bounds) ends on the
    random model: no undeclared keys, at most 16 digits per number part (sampling/json_limits.py)."""
    item = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}, "required": ["n"]}
    schema = {
        "$defs": {"Item": item},
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "count": {"type": "integer"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            "best": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]},
        },
        "required": ["name", "count", "items"],
    }
    for seed in range(4):
        r = client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            temperature=1.0,
            seed=seed,
            max_tokens=600,  # it ends (the 4 answers: 80 to 265 tokens); where depends on the slot's numerics
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        answer = json.loads(r.choices[0].message.content)
        jsonschema.validate(answer, schema)
        assert set(answer) <= set(schema["properties"])
        for it in [*answer["items"], answer.get("best") or {}]:
            assert set(it) <= {"n", "x"}


def test_errors_through_the_openai_client(server: Server, client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hello " * 2500}])
    assert e.value.code == "context_length_exceeded" and "2048" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # also when streaming: a 400 before the stream starts
        client.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "hello " * 2500}], stream=True
        )
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model=ALIAS, input="hello")
    assert e.value.status_code == 501 and e.value.body["code"] == "embeddings_not_supported"


# ---------------------------------------------------------------------------------------------- logprobs and choices


def test_logprobs_without_logits_all(client: Any, word_tokens: dict[str, int]) -> None:
    """This server runs without --logits-all: generated tokens' logprobs are served, whole and streamed, in the
    completion and the chat shapes, and they are of the model's own distribution (a logit_bias forcing a word
    does not change them)."""
    word, tok = next(iter(word_tokens.items()))
    bias = {str(tok): 100}
    r = client.completions.create(model=ALIAS, prompt="Once upon a time,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == len("Once upon a time,") and lp.text_offset == sorted(lp.text_offset)
    s = list(
        client.completions.create(
            model=ALIAS, prompt="Once upon a time,", max_tokens=4, temperature=0, logprobs=2, stream=True
        )
    )
    assert [v for c in s if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs

    r = client.completions.create(model=ALIAS, prompt="Hi", max_tokens=3, temperature=0, logprobs=1, logit_bias=bias)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == word * 3 and lp.tokens == [word] * 3
    assert all(v < max(top.values()) for v, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True))

    c = client.chat.completions.create(
        model=ALIAS, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2, logit_bias=bias
    )
    content = c.choices[0].logprobs.content
    assert [e.token for e in content] == [word] * 3 and [bytes(e.bytes).decode() for e in content] == [word] * 3
    assert all(len(e.top_logprobs) == 2 and e.logprob < e.top_logprobs[0].logprob for e in content)
    assert all(t.bytes == list(t.token.encode()) for e in content for t in e.top_logprobs if "\ufffd" not in t.token)
    chunks = list(
        client.chat.completions.create(
            model=ALIAS,
            messages=MESSAGES,
            max_tokens=3,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            logit_bias=bias,
            stream=True,
        )
    )
    streamed = [e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]

    # the prompt's logprobs (echo) need every position's logits: a clear 400 naming the flag
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ALIAS, prompt="Hi", max_tokens=2, logprobs=1, echo=True)
    assert "--logits-all" in str(e.value) and e.value.body["param"] == "echo"


def test_several_choices_in_chat(client: Any) -> None:
    """n choices, each with its index; usage sums the completion tokens; seeded choices differ from each other and
    are reproducible, the first is the n=1 answer; at temperature 0 they are the same; streams carry the index."""
    msgs = [{"role": "user", "content": "Tell me a story."}]
    kw: dict[str, Any] = dict(model=ALIAS, messages=msgs, max_tokens=4, temperature=1.0, seed=5)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    assert [c.message.content for c in client.chat.completions.create(n=3, **kw).choices] == texts
    assert client.chat.completions.create(**kw).choices[0].message.content == texts[0]
    same = client.chat.completions.create(n=3, **{**kw, "temperature": 0.0})
    assert len({c.message.content for c in same.choices}) == 1

    chunks = list(
        client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, **kw)
    )
    assert len({c.id for c in chunks}) == 1
    by_index: dict[int, str] = {}
    roles = []
    for c in chunks[:-1]:
        (ch,) = c.choices
        by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
        roles += [ch.index] if ch.delta.role == "assistant" else []
    assert roles == [0, 1] and [by_index[0], by_index[1]] == texts[:2]
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_prompt_lists_and_choices_in_completions(server: Server, client: Any) -> None:
    """A list of prompts (text or token ids) times n: choice index = prompt index * n + j, as OpenAI orders them;
    usage counts each prompt once."""
    prompts = ["Alpha beta gamma", "Delta epsilon"]
    ids = [httpx.post(server.url + "/tokenize", json={"content": p}, headers=AUTH).json()["tokens"] for p in prompts]
    kw: dict[str, Any] = dict(model=ALIAS, max_tokens=3, temperature=1.0, seed=9, echo=True)
    for prompt in (prompts, ids):
        r = client.completions.create(prompt=prompt, n=2, **kw)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text[: len(prompts[i // 2])] for i, c in enumerate(r.choices)] == [prompts[0]] * 2 + [prompts[1]] * 2
        assert r.choices[0].text != r.choices[1].text
        assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and r.usage.completion_tokens == 12
    one = client.completions.create(prompt=ids[1], **kw)  # a list of ids is one prompt
    assert len(one.choices) == 1 and one.choices[0].text == r.choices[2].text  # the same seed: the same answer

    s = list(client.completions.create(prompt=prompts, n=2, stream=True, stream_options={"include_usage": True}, **kw))
    order = [c.choices[0].index for c in s[:-1]]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3} and len({c.id for c in s}) == 1
    assert s[-1].usage.completion_tokens == 12 and s[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_choice_bounds_are_400_naming_them(server: Server) -> None:
    def err(path: str, body: dict[str, Any]) -> str:
        r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400, r.text
        return str(error_of(r)["message"])

    assert "at most 16 choices per request" in err("/v1/chat/completions", {"messages": MESSAGES, "n": 17})
    assert "17 prompts" in err("/v1/completions", {"prompt": ["a"] * 17})
    assert "at most 16" in err("/v1/completions", {"prompt": ["a"] * 4, "n": 5})
    t0 = time.monotonic()  # a body (under --max-body-mib 1) of 200,000 prompts: refused before they are looked at
    assert "200000 prompts" in err("/v1/completions", {"prompt": [[1]] * 200_000})
    assert time.monotonic() - t0 < 10
    # n x max_tokens: at most 4 contexts of the slot's 2048 tokens (an unset max_tokens counts as the context)
    msg = err("/v1/chat/completions", {"messages": MESSAGES, "n": 5})
    assert "limit of 8192 generated tokens" in msg and "unset" in msg
    assert "limit of 8192" in err("/v1/completions", {"prompt": "a", "n": 3, "max_tokens": 3000})
    # every prompt of a list is checked before anything is generated (a stream too: a 400, not a broken stream)
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": ["a", "hello " * 2500], "stream": True},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def test_langchain_chat_openai(server: Server, word_tokens: dict[str, int]) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    word, tok = list(word_tokens.items())[3]
    chat = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key=KEY,
        model=ALIAS,
        temperature=0,
        max_tokens=4,
        max_retries=0,
        logit_bias={tok: 100},
    )
    assert chat.invoke("Hello").content == word * 4
    assert "".join(c.content for c in chat.stream("Hello")) == word * 4

    class Weather(BaseModel):
        """Weather in a city."""

        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)

    free = ChatOpenAI(
        base_url=server.url + "/v1", api_key=KEY, model=ALIAS, temperature=0.8, seed=4, max_tokens=200, max_retries=0
    )
    msg = free.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Oslo for 3 days?")
    (call,) = msg.tool_calls
    assert call["name"] == "Weather" and 1 <= call["args"]["days"] <= 7 and len(call["args"]["city"]) <= 8
    w = free.with_structured_output(Weather, method="json_schema").invoke("Weather in Paris?")
    assert isinstance(w, Weather) and 1 <= w.days <= 7


# ---------------------------------------------------------------------------------------------- plain HTTP


def test_api_key_on_every_endpoint_but_health(server: Server) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/props"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("POST", "/v1/embeddings"),
    ):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert error_of(r)["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
    preflight = httpx.options(
        server.url + "/v1/chat/completions",
        headers={
            "Origin": "http://example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] in (
        "*",
        "http://example.org",
    )


def test_tokenize_detokenize(server: Server) -> None:
    def post(path: str, body: dict[str, Any]) -> Any:
        r = httpx.post(server.url + path, json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()

    ids = post("/tokenize", {"content": "Hello world"})["tokens"]
    assert post("/detokenize", {"tokens": ids}) == {"content": "Hello world"}
    assert post("/extras/detokenize", {"tokens": ids}) == {"text": "Hello world"}
    pieces = post("/tokenize", {"content": "Hello world", "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == "Hello world"
    bos = "<｜begin▁of▁sentence｜>"
    special = post("/tokenize", {"content": bos + "Hi"})["tokens"]
    plain = post("/tokenize", {"content": bos + "Hi", "parse_special": False})["tokens"]
    assert len(special) < len(plain) and post("/detokenize", {"tokens": special[:1]}) == {"content": bos}
    assert post("/extras/tokenize/count", {"input": "Hello world"})["count"] in (len(ids), len(ids) + 1)


MESSAGES = [{"role": "user", "content": "hi"}]
MALFORMED = [
    ("/v1/chat/completions", b"{not json", "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", "invalid_json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "invalid_json"),
    ("/v1/chat/completions", b"[" * 50000 + b"]" * 50000, None),
    ("/v1/chat/completions", {"messages": "hi"}, None),
    ("/v1/chat/completions", {"messages": []}, None),
    ("/v1/chat/completions", {}, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -1}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**20}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "10"}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 3}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 0}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 17}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1, 2]}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"abc": 1}}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"99999999": 1}}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, None),
    (
        "/v1/chat/completions",
        {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        None,
    ),
    ("/v1/chat/completions", {"messages": MESSAGES, "tool_choice": "sometimes"}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "yaml"}}, None),
    (
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
            },
        },
        None,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]},
        None,
    ),
    ("/v1/chat/completions", {"messages": MESSAGES, "grammar": "root ::= ("}, None),
    ("/v1/completions", {"prompt": {"x": 1}}, None),
    ("/v1/completions", {"prompt": []}, None),
    ("/v1/completions", {"prompt": [[]]}, None),
    ("/v1/completions", {"prompt": ["a", [1]]}, None),
    ("/v1/completions", {"prompt": [[1], "a"]}, None),
    ("/v1/completions", {"prompt": [1, -2]}, None),
    ("/v1/completions", {"prompt": [True]}, None),
    ("/v1/completions", {"prompt": [[1, 2.5]]}, None),
    ("/v1/completions", {"prompt": ["a"] * 17}, None),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, None),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 3, "max_tokens": 2000}, None),
    ("/v1/completions", {"prompt": ["a", "hello " * 2500]}, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [[5], [10**9]], "stream": True}, None),
    ("/v1/completions", {"prompt": [10**9]}, None),
    ("/v1/completions", {"prompt": "x", "logprobs": 2, "echo": True}, None),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, None),
    ("/v1/completions", {"prompt": "x", "suffix": 3}, None),
    ("/v1/completions", {"prompt": "hello " * 2500}, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hello " * 2500, "stream": True}, "context_length_exceeded"),
    ("/tokenize", {}, None),
    ("/tokenize", {"content": 5}, None),
    ("/detokenize", {"tokens": [-1]}, None),
    ("/detokenize", {"tokens": [10**9]}, None),
    ("/detokenize", {"tokens": "abc"}, None),
    ("/v1/embeddings", {"input": {"x": 1}}, None),
]


@pytest.mark.parametrize(("path", "body", "code"), MALFORMED, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(MALFORMED)])
def test_malformed_requests_are_4xx_with_an_error_body(server: Server, path: str, body: Any, code: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={**AUTH, "Content-Type": "application/json"}, timeout=60, **kw)
    err = error_of(r)
    assert r.status_code == 400, (r.status_code, err)
    if code is not None:
        assert err["code"] == code, err
    if code == "context_length_exceeded":
        assert err["param"] == "prompt" and "2048 tokens" in err["message"] and "--ctx-size" in err["message"]


def test_hostile_grammars_and_schemas_are_400_and_the_server_lives(server: Server) -> None:
    """Grammars and schemas that killed the server (SIGSEGV in llguidance's compiler) or answered with a Rust
    backtrace: a 400 naming the bound, without a backtrace or a path, and the server goes on."""
    deep_tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"p": {"$ref": "#/$defs/d0"}},
                "$defs": hg.object_chain(1000)["$defs"],
            },
        },
    }
    cases = [
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": hg.ref_chain(3000)}}},
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_object", "schema": hg.object_chain(1000)}}),
        ("/v1/chat/completions", {"grammar": hg.gbnf_chain(4000)}),
        ("/v1/chat/completions", {"tools": [deep_tool], "tool_choice": "required"}),
        ("/v1/completions", {"grammar": hg.gbnf_alternation(60000)}),
    ]
    for path, extra in cases:
        body = {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "hi"}
        r = httpx.post(server.url + path, json={**body, **extra}, headers=AUTH, timeout=120)
        err = error_of(r)
        assert r.status_code == 400 and ("at most 256" in err["message"] or "longer than" in err["message"]), err
        assert not any(s in r.text for s in ("backtrace", "<unknown>", ".rs:", "Traceback", "/tmp/")), r.text
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.proc.poll() is None


def test_a_chat_prompt_longer_than_the_context_stops_rendering(server: Server) -> None:
    """Rendering stops once the prompt is longer than the slot's context could hold (2048 tokens of at most 128
    bytes: 256 KiB), instead of tokenizing it all first; still a context_length_exceeded."""
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello " * 50_000}]},
        headers=AUTH,
        timeout=60,
    )
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages", err
    assert "context of 2048 tokens" in err["message"] and "--ctx-size" in err["message"]


def test_oversize_bodies_wrong_methods_and_unknown_routes(server: Server) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers=AUTH)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers=AUTH)
    assert r.status_code == 413
    assert error_of(httpx.get(server.url + "/v1/chat/completions", headers=AUTH))["message"]
    assert error_of(httpx.get(server.url + "/v2/nothing", headers=AUTH))["code"] == "not_found"
    m = metrics_of(server)
    assert not [k for k in m if "status=500" in k]  # nothing so far was a server error
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- concurrency


def test_disconnect_frees_the_slot_and_queue_depth_shows(server: Server) -> None:
    """Two long streams hold both slots; a third request queues (/metrics shows it); dropping one stream frees
    its slot at once and the queued request runs."""
    before = metrics_of(server)
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1900, "stream": True}

    async def run() -> float:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            held = []
            for _ in range(2):
                cm = c.stream("POST", "/v1/chat/completions", json=body)
                r = await cm.__aenter__()
                lines = r.aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass
                held.append((cm, lines))
            third = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
            for _ in range(100):
                m = metrics_of(server)
                if m["llamadsv4:requests_deferred"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert m["llamadsv4:requests_deferred"] == 1 and m["llamadsv4:requests_processing"] == 2
            t0 = time.perf_counter()
            await held[0][0].__aexit__(None, None, None)  # client 1 goes away mid-stream
            r3 = await third
            waited = time.perf_counter() - t0
            assert r3.status_code == 200 and r3.json()["usage"]["completion_tokens"] == 2
            await held[1][0].__aexit__(None, None, None)
            return waited

    waited = asyncio.run(run())
    assert waited < 5, waited  # freed at the next token (a few ms), not when 1900 tokens were done
    for _ in range(100):
        m = metrics_of(server)
        if m["llamadsv4:requests_processing"] == 0:
            break
        time.sleep(0.05)
    assert m["llamadsv4:requests_processing"] == 0 and m["llamadsv4:requests_deferred"] == 0
    assert m["llamadsv4:completions_cancelled_total"] - before["llamadsv4:completions_cancelled_total"] == 2
    assert m["llamadsv4:tokens_predicted_total"] < before["llamadsv4:tokens_predicted_total"] + 2 * 1900


def wait_idle(server: Server) -> dict[str, float]:
    for _ in range(200):
        m = metrics_of(server)
        if m["llamadsv4:requests_processing"] == 0 and m["llamadsv4:requests_deferred"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {m}")


def test_clients_that_leave_while_waiting_or_before_a_whole_answer(server: Server) -> None:
    """A non-streamed request whose client gives up stops at the next token; a queued one never runs."""
    before = wait_idle(server)
    long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1900}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=long, headers=AUTH, timeout=0.5)
    m = wait_idle(server)
    assert m["llamadsv4:completions_cancelled_total"] == before["llamadsv4:completions_cancelled_total"] + 1
    assert m["llamadsv4:tokens_predicted_total"] < before["llamadsv4:tokens_predicted_total"] + 1900

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            busy = [asyncio.ensure_future(c.post("/v1/chat/completions", json=long)) for _ in range(2)]
            for _ in range(100):
                if metrics_of(server)["llamadsv4:requests_processing"] == 2:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then its client leaves
                await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=0.5)
            for _ in range(40):  # it leaves the queue with its client
                if metrics_of(server)["llamadsv4:requests_deferred"] == 0:
                    break
                await asyncio.sleep(0.025)
            assert metrics_of(server)["llamadsv4:requests_deferred"] == 0
            assert metrics_of(server)["llamadsv4:requests_processing"] == 2
            for b in busy:
                b.cancel()
            await asyncio.gather(*busy, return_exceptions=True)

    asyncio.run(run())
    m2 = wait_idle(server)
    # the two long ones ran (and were stopped when their clients left); the queued one never started
    assert m2["llamadsv4:completions_total"] == m["llamadsv4:completions_total"] + 2
    assert m2["llamadsv4:completions_cancelled_total"] == m["llamadsv4:completions_cancelled_total"] + 2


def test_load_16_concurrent_streams_200_requests(server: Server, word_tokens: dict[str, int]) -> None:
    words = list(word_tokens.items())
    n_requests, concurrency, n_tokens = 200, 16, 6

    def request(i: int) -> tuple[str, dict[str, Any], str | None, int | None]:
        """(path, body, the text it must produce, chunks after which the client disconnects)."""
        word, tok = words[i % len(words)]
        bias = {str(tok): 100}
        leave = 2 if i % 8 == 5 else None  # 25 clients go away mid-stream (asking for many tokens)
        max_tokens = 400 if leave else n_tokens
        body = {"max_tokens": max_tokens, "temperature": 0, "logit_bias": bias, "stream": True}
        if i % 5 == 4:
            return "/v1/completions", {"prompt": f"Request {i}:", **body}, word * n_tokens, leave
        chat = {"messages": [{"role": "user", "content": f"Request {i}"}], **body}
        return "/v1/chat/completions", chat, word * n_tokens, leave

    async def one(c: Any, sem: asyncio.Semaphore, i: int) -> tuple[int, str, list[dict[str, Any]], bool]:
        path, body, _, leave = request(i)
        async with sem, c.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            events, done = [], False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                events.append(json.loads(line[6:]))
                if leave and len(events) >= leave:
                    break  # leaving the block drops the connection
            return i, path, events, done

    async def run(ids: range) -> list[tuple[int, str, list[dict[str, Any]], bool]]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, sem, i) for i in ids))

    asyncio.run(run(range(1000, 1016)))  # warm up: every slot, both endpoints, the HTTP machinery
    time.sleep(0.5)
    baseline = server.rss()
    before = metrics_of(server)
    t0 = time.perf_counter()
    results = asyncio.run(run(range(n_requests)))
    elapsed = time.perf_counter() - t0

    assert sorted(r[0] for r in results) == list(range(n_requests))  # none lost
    left = [r for r in results if request(r[0])[3]]
    whole = [r for r in results if not request(r[0])[3]]
    assert len(left) == 25 and len(whole) == 175
    for i, path, events, done in whole:
        expected = request(i)[2]
        assert done, (i, events)
        assert len({e["id"] for e in events}) == 1
        if path == "/v1/completions":
            text = "".join(e["choices"][0]["text"] for e in events)
        else:
            assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert text == expected, (i, text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])

    for _ in range(200):  # the dropped streams stop at their next token
        m = metrics_of(server)
        if m["llamadsv4:requests_processing"] == 0:
            break
        time.sleep(0.05)
    assert m["llamadsv4:requests_processing"] == 0 and m["llamadsv4:requests_deferred"] == 0
    assert m["llamadsv4:completions_total"] - before["llamadsv4:completions_total"] == n_requests
    assert m["llamadsv4:completions_cancelled_total"] - before["llamadsv4:completions_cancelled_total"] == 25
    generated = m["llamadsv4:tokens_predicted_total"] - before["llamadsv4:tokens_predicted_total"]
    assert 175 * n_tokens <= generated < 175 * n_tokens + 25 * 100  # the dropped ones stopped early
    assert m["llamadsv4:predicted_tokens_seconds"] > 0
    key = "llamadsv4:requests_total{route=/v1/chat/completions,status=200}"
    assert m[key] - before.get(key, 0) == 160
    time.sleep(0.5)
    grown = server.rss() - baseline
    assert grown < max(32 << 20, baseline // 10), (baseline >> 20, grown >> 20, elapsed)  # MiB, MiB, s


# ---------------------------------------------------------------------------------------------- the card's command

CARD = shlex.split(
    "--model DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf --host 0.0.0.0 --port 8082 --ctx-size 1048576 "
    "--flash-attn on --batch-size 2048 --ubatch-size 1024 -t 20 --n-gpu-layers all --mlock --moe-hot-count auto "
    "--jinja --chat-template-file deepseek-ai-DeepSeek-V4.jinja"
)


def test_card_command_line_maps_to_llama_kwargs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf", "deepseek-ai-DeepSeek-V4.jinja"):
        (tmp_path / name).write_text("")
    monkeypatch.setattr(flags_mod, "usable_cpus", lambda: 32)
    s = parse_args(CARD, env={})
    assert (s.host, s.port, s.parallel, s.model_name) == (
        "0.0.0.0",
        8082,
        1,
        "DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf",
    )
    assert s.chat_template_file == "deepseek-ai-DeepSeek-V4.jinja"
    assert s.llama_kwargs() == {
        "n_ctx": 1048576,
        "n_batch": 2048,
        "n_ubatch": 1024,
        "n_threads": 20,
        "n_threads_batch": 20,
        "n_gpu_layers": -1,
        "flash_attn": True,
        "use_mlock": True,
        "use_mmap": True,
        "device": "auto",
        "logits_all": False,
        "verbose": False,
        "moe_hot_count": "auto",
    }
    assert any(n.startswith("--jinja: accepted") for n in s.notes)
    from llama_dsv4.server.slots import fit_context

    assert fit_context(s, 1048576) == (1048576, [])
    n_ctx, notes = fit_context(s, 4096)
    assert n_ctx == 4096 and "more than the model's trained context" in notes[0]

    # llama-server's other spellings
    monkeypatch.setattr(flags_mod, "usable_cpus", lambda: 2)
    s = parse_args(
        [
            "-m",
            CARD[1],
            "-c",
            "8192",
            "-b",
            "512",
            "-ub",
            "256",
            "-t",
            "20",
            "-tb",
            "2",
            "-ngl",
            "99",
            "-np",
            "4",
            "-nocb",  # (a context per slot: the slots' computations share the CPUs)
            "--api-key",
            "a,b",
            "-a",
            "ds",
            "-fa",
            "-s",
            "7",
            "-ctk",
            "f32",
            "--moe-hot-count",
            "2,3",
            "--moe-hot-budget-mib",
            "512",
            "--moe-prefetch",
            "--metrics",
            "-to",
            "30",
            "-n",
            "64",
            "--temp",
            "0.2",
            "-sm",
            "row",
            "--no-webui",
            "--reasoning-format",
            "none",
        ],
        env={},
    )
    kw = s.llama_kwargs()
    assert (kw["n_ctx"], kw["n_batch"], kw["n_ubatch"], kw["n_threads"], kw["n_threads_batch"]) == (
        8192,
        512,
        256,
        1,  # 4 slots share 2 CPUs
        1,
    )
    assert (kw["seed"], kw["type_k"], kw["moe_hot_count"], kw["moe_hot_budget_mib"]) == (7, 0, [2, 3], 512.0)
    assert kw["moe_prefetch"] is True
    assert (s.parallel, s.api_keys, s.alias, s.timeout, s.n_predict, s.temperature) == (
        4,
        ["a", "b"],
        "ds",
        30,
        64,
        0.2,
    )
    assert s.reasoning_format == "none" and kw["flash_attn"] is True
    assert any("--threads=20 in each of 4 slots" in n and "using 1 per slot" in n for n in s.notes), s.notes
    assert any(n.startswith("-sm row: accepted") for n in s.notes)
    assert parse_args(["-m", CARD[1], "-ngl", "0"], env={}).llama_kwargs()["device"] == "cpu"  # no offload
    assert parse_args(["-m", CARD[1], "--no-mmap"], env={}).llama_kwargs()["use_mmap"] is False  # weights read in
    assert parse_args(["-m", CARD[1], "--no-mmap", "--mmap"], env={}).llama_kwargs()["use_mmap"] is True
    import llama_dsv4.hub
    from llama_dsv4.server.slots import resolve_model

    calls = []
    monkeypatch.setattr(llama_dsv4.hub, "download", lambda repo, name, token: calls.append((repo, name, token)) or "p")
    assert resolve_model(parse_args(["-hf", "user/repo:Q8xQ5"], env={"HF_TOKEN": "t"})) == "p"
    assert resolve_model(parse_args(["-hf", "user/repo", "-hff", "m-00001-of-00003.gguf"], env={})) == "p"
    assert resolve_model(parse_args(["-hf", "user/repo"], env={})) == "p"
    assert calls == [
        ("user/repo", "*Q8xQ5*.gguf", "t"),
        ("user/repo", "m-00001-of-00003.gguf", None),
        ("user/repo", "", None),
    ]
    assert parse_args(["-m", CARD[1]], env={"LLAMA_API_KEY": "k"}).api_keys == ["k"]

    for bad, why in (
        (["-m", CARD[1], "--bogus"], "--bogus"),
        (["-m", CARD[1], "-c", "lots"], "--ctx-size"),
        (["-m", CARD[1], "--flash-attn", "maybe"], "--flash-attn"),
        ([], "no model"),
        (["-m", "missing.gguf"], "no such file"),
        (["-m", CARD[1], "--moe-hot-count", "x"], "moe"),
        (["-m", CARD[1], "--chat-template-file", "nope.jinja"], "nope.jinja"),
        (["-m", CARD[1], "-np", "0"], "--parallel"),
    ):
        with pytest.raises(SettingsError, match=why):
            parse_args(bad, env={})
    from llama_dsv4.server.serve import main

    assert main(["-m", CARD[1], "--no-such-flag"]) == 2


def test_card_command_line_starts_a_server(real_vocab_path: str, tmp_path: Any) -> None:
    from llama_dsv4.model.writer import default_chat_template

    template = tmp_path / "deepseek-ai-DeepSeek-V4.jinja"
    template.write_text(default_chat_template())
    args = list(CARD)
    args[args.index("--model") + 1] = real_vocab_path
    args[args.index("--chat-template-file") + 1] = str(template)
    del args[args.index("--host") : args.index("--host") + 2]
    del args[args.index("--port") : args.index("--port") + 2]
    srv = Server(args, str(tmp_path / "card.log"), home=str(tmp_path))
    try:
        srv.wait_ready()
        props = httpx.get(srv.url + "/props").json()
        assert props["n_ctx"] == 4096 and props["chat_format"] == "chat_template.file"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        text = httpx.get(srv.url + "/metrics").text
        if "moe_stats" in dir(__import__("llama_dsv4").Llama):  # MoE residency (issue 6) is in this build
            assert 'llamadsv4:moe_enabled{slot="0"} 1' in text and "llamadsv4:moe_hot_experts_per_layer{" in text
    finally:
        code = srv.stop()
    log = srv.log()
    assert code == 0, log
    assert "--ctx-size 1048576 is more than the model's trained context: using 4096" in log
    assert "--jinja: accepted" in log


def test_moe_figures_in_metrics_from_a_stub() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    from llama_dsv4.server.metrics import Metrics

    class Stub:
        def moe_stats(self) -> dict[str, Any]:
            return {
                "enabled": True,
                "locked_bytes": 1 << 30,
                "lock_failed_bytes": 0,
                "resident_bytes": 3 << 29,
                "hot_bytes": 1 << 30,
                "budget_configured_bytes": 2 << 30,
                "budget_effective_bytes": 1 << 31,
                "hit_rate": 0.75,
                "hits": 300,
                "routed": 400,
                "reclassify_total": 5,
                "reclassify_seconds_total": 0.5,
                "hot_per_layer": [4, 0, 7],
                "prefetch_calls": 16,
                "prefetch_slices": 288,
                "prefetch_missing_slices": 40,
                "prefetch_missing_bytes": 1 << 20,
            }

    class Off:
        def moe_stats(self) -> None:
            return None

    class Slot:
        def __init__(self, i: int, llm: Any) -> None:
            self.id, self.llm, self.n_ctx, self.job = i, llm, 4096, None

    m = Metrics()
    m.request("/v1/chat/completions", 200)
    m.job(n_prompt=10, n_predicted=20, t_prompt=0.5, t_predict=2.0, cancelled=False)
    text = m.render([Slot(0, Stub()), Slot(1, Off()), Slot(2, object())], waiting=3)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parser.text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert values[("llamadsv4:moe_hot_locked_bytes", (("slot", "0"),))] == 1 << 30
    assert values[("llamadsv4:moe_hit_rate", (("slot", "0"),))] == 0.75
    assert values[("llamadsv4:moe_hits_total", (("slot", "0"),))] == 300
    assert values[("llamadsv4:moe_prefetch_calls_total", (("slot", "0"),))] == 16
    assert values[("llamadsv4:moe_prefetch_missing_bytes_total", (("slot", "0"),))] == 1 << 20
    assert [values[("llamadsv4:moe_hot_experts_per_layer", (("layer", str(i)), ("slot", "0")))] for i in range(3)] == [
        4,
        0,
        7,
    ]
    assert not any(k[1] == (("slot", "1"),) for k in values if k[0].startswith("llamadsv4:moe"))
    assert values[("llamadsv4:requests_deferred", ())] == 3
    assert values[("llamadsv4:predicted_tokens_seconds", ())] == 10.0
    assert values[("llamadsv4:requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 1


def test_a_model_whose_template_cannot_be_used_still_serves(hostile_template_path: str, tmp_path: Any) -> None:
    """The file's template made the server exit at start with a traceback (IndentationError); now it starts with
    a warning and serves chat with our template."""
    srv = start_server(hostile_template_path, str(tmp_path / "server.log"), "-np", "1")
    try:
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 2},
            headers=AUTH,
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "using llama-dsv4's DeepSeek V4 template" in log and "chat format deepseek-v4" in log
    assert "Traceback" not in log


def test_chat_template_flag() -> None:
    from llama_dsv4.chat.formats import LlamaChatCompletionHandlerRegistry
    from llama_dsv4.chat.registry import ChatFormatRegistry
    from llama_dsv4.server.slots import apply_chat_template

    class Stub:
        def __init__(self) -> None:
            self.chat_formats = ChatFormatRegistry(parent=LlamaChatCompletionHandlerRegistry())
            self.chat_formats.register_chat_completion_handler("chat_template.default", lambda **kw: None)
            self.chat_format = "chat_template.default"

    def applied(value: str) -> Stub:
        llm = Stub()
        apply_chat_template(llm, Settings(chat_template=value))
        return llm

    assert applied("deepseek-v4").chat_format == "deepseek-v4"
    assert applied("deepseek3").chat_format == "deepseek-v4"  # llama-server's built-in names for DeepSeek
    inline = applied("{% for m in messages %}{{ m.content }}{% endfor %}")
    inline_handler = inline.chat_formats.get_chat_completion_handler_by_name("chat_template.cli")
    assert inline.chat_format == "chat_template.cli" and inline_handler.name == "chat_template.cli"
    assert applied("chatml").chat_format == "chatml"  # a named format (llama-server's built-in name too)
    with pytest.raises(ValueError, match="not a template of this model nor a named chat format"):
        applied("no-such-format")
    with pytest.raises(ValueError, match="does not compile"):
        applied("{{ broken")


def test_the_routes_and_which_want_the_api_key() -> None:
    """The app's routes are the API's 17 (routes/ lists them once), /health alone without the key; /metrics counts
    requests by exactly these paths (others as "other")."""
    from fastapi.testclient import TestClient

    from llama_dsv4.server.app import create_app
    from llama_dsv4.server.metrics import Metrics
    from llama_dsv4.server.middleware import Counting
    from llama_dsv4.server.slots import SlotPool

    get = ("/health", "/v1/health", "/v1/models", "/models", "/metrics", "/props")
    post = (
        "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/v1/embeddings",
        "/embeddings", "/tokenize", "/extras/tokenize", "/extras/tokenize/count", "/detokenize", "/extras/detokenize",
    )  # fmt: skip
    pool = SlotPool([(object(), 64)])
    app = create_app(Settings(api_keys=[KEY]), pool, Metrics())
    try:
        routes = {(p, m) for p, methods in app.openapi()["paths"].items() for m in methods}
        assert routes == {(p, "get") for p in get} | {(p, "post") for p in post}
        counting = [m for m in app.user_middleware if m.cls is Counting]
        assert len(counting) == 1 and set(counting[0].kwargs["routes"]) == set(get + post)
        client = TestClient(app)
        for path in get + post:
            method, other = ("GET", "POST") if path in get else ("POST", "GET")
            keyless = client.request(method, path, json={})
            assert keyless.status_code == (200 if path.endswith("/health") else 401), path
            assert client.request(other, path, headers=AUTH).status_code == 405, path
        assert client.get("/nope", headers=AUTH).status_code == 404
    finally:
        pool.close()


def test_a_free_slot_is_chosen_by_the_prompt_it_shares() -> None:
    """SlotPool.enqueue (llama-server's --slot-prompt-similarity over the request's text): among free slots the
    one whose last prompt shares the longest prefix, more than the threshold of the prompt; else the slot free the
    longest; a waiting request takes the slot released. Chats compare whole messages from the first one on."""
    import asyncio

    from llama_dsv4.server.slots import SlotPool, overlap

    sys_a, sys_b = '{"content": "You are A", "role": "system"}', '{"content": "You are B", "role": "system"}'
    q1, a1, q2 = '{"content": "q1", "role": "user"}', '{"content": "a1", "role": "assistant"}', '{"q2": 2}'
    assert overlap((sys_a, q1), (sys_a, q1, a1, q2)) == (len(sys_a) + len(q1), len(sys_a + q1 + a1 + q2))
    assert overlap((sys_a, q1), (sys_b, q1)) == (0, len(sys_b + q1))  # the same keys inside differ: nothing
    assert overlap("abcd", "abxy") == (2, 4) and overlap([1, 2, 3], [1, 2]) == (2, 2) and overlap(None, "ab") == (0, 2)
    assert overlap("abc", [1]) == (0, 1)

    async def run() -> None:
        pool = SlotPool([(object(), 64) for _ in range(3)])
        try:

            async def take(prompt: object) -> int:
                slot = await pool.wait(pool.enqueue(prompt))  # type: ignore[arg-type]
                pool.release(slot)
                return slot.id

            assert await take((sys_a, q1)) == 0  # nothing shared anywhere: the slot free the longest
            assert await take((sys_b, q1)) == 1
            assert await take("a text prompt") == 2
            assert await take((sys_a, q1, a1, q2)) == 0  # the chat's next turn: where its first turn is held
            assert await take((sys_b, q2)) == 1  # the same system prompt, another question
            assert await take("a text prompt, longer") == 2
            assert await take([5, 6, 7]) == 0  # no slot shares anything: the slot free the longest (0)
            assert await take([5, 6, 8, 9]) == 0
            assert await take([1, 6, 8, 9]) == 1
            pool.similarity = 0.0  # off: always the slot free the longest
            assert [await take([5, 6, 8, 9]) for _ in range(3)] == [2, 0, 1]
            pool.similarity = 0.5  # a prefix of at most half the prompt is not enough
            assert await take([5, 6, 8, 9]) == 2 and await take([5, 6, 1, 1]) == 0
            busy = [await pool.wait(pool.enqueue(None)) for _ in range(3)]
            waiting = pool.enqueue("queued")
            assert not waiting.done() and pool.waiting == 1
            pool.release(busy[1])  # the first slot released goes to the waiting request
            got = await pool.wait(waiting)
            assert got is busy[1] and got.prompt == "queued"
        finally:
            pool.close()

    asyncio.run(run())


def test_the_completion_routes_hand_their_prompt_to_the_slot_choice() -> None:
    """Over HTTP (stand-in models): a chat's next turn, sent after other chats, runs on the slot its first turn ran
    on; a text completion's too."""
    from fastapi.testclient import TestClient

    from llama_dsv4.server.app import create_app
    from llama_dsv4.server.metrics import Metrics
    from llama_dsv4.server.slots import SlotPool

    served: list[tuple[int, str]] = []

    class Stub:
        def __init__(self, i: int) -> None:
            self.i = i

        def _answer(self, what: str, obj: str) -> dict[str, Any]:
            served.append((self.i, what))
            msg = {"message": {"role": "assistant", "content": "ok"}} if obj == "chat.completion" else {"text": "ok"}
            return {
                "id": "x",
                "object": obj,
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, **msg}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        def create_chat_completion(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            return self._answer(messages[-1]["content"], "chat.completion")

        def create_completion(self, prompt: str, **kw: Any) -> dict[str, Any]:
            return self._answer(prompt, "text_completion")

    pool = SlotPool([(Stub(i), 4096) for i in range(3)])
    client = TestClient(create_app(Settings(api_keys=[KEY]), pool, Metrics()))
    system = {"role": "system", "content": "You answer in French. " * 20}

    def chat(*messages: dict[str, Any]) -> None:
        r = client.post("/v1/chat/completions", json={"messages": list(messages)}, headers=AUTH)
        assert r.status_code == 200, r.text

    try:
        chat(system, {"role": "user", "content": "first"})
        chat({"role": "system", "content": "Other."}, {"role": "user", "content": "second"})
        r = client.post("/v1/completions", json={"prompt": "Once upon a time"}, headers=AUTH)
        assert r.status_code == 200, r.text
        chat({"role": "user", "content": "third"})
        chat(system, {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "next turn"})  # fmt: skip
        r = client.post("/v1/completions", json={"prompt": "Once upon a time, there"}, headers=AUTH)
        assert r.status_code == 200, r.text
        slot = dict((what, i) for i, what in served)
        assert served[:4] == [(0, "first"), (1, "second"), (2, "Once upon a time"), (0, "third")]
        assert slot["next turn"] != slot["first"]  # "third" took slot 0 (free the longest): that turn is gone ...
        chat(system, {"role": "user", "content": "again"})  # ... but the system prompt is where "next turn" ran
        assert served[-1] == (slot["next turn"], "again") and slot["Once upon a time, there"] == 2
    finally:
        pool.close()
