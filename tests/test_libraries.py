"""Libraries on llama-cpp-python's high-level API, and OpenAI clients, run unchanged against llama-dsv4 (issue 14
item 3): instructor (its patch of `Llama.create_chat_completion_openai_v1`, and on the server), DSPy (`dspy.LM`
against llama-dsv4-server), Haystack's llama.cpp generators and LlamaIndex's LlamaCPP through the `llama_cpp`
alias; the OpenAI SDK's `parse` and stream helpers and langchain-openai against the server.

A library that is not a dev dependency is installed pinned at test time (tests/pypi_packages.py) and runs in a
child process. The weights are random, so every check that wants a structured answer constrains decoding (a JSON
schema or a forced tool call) and asserts that the answer validates and closed (finish_reason "stop" / "tool_calls").
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field
from pypi_packages import run_python, site_dir

openai = pytest.importorskip("openai")
from test_server import KEY, Server, start_server  # noqa: E402 - after the skip: test_server needs the server extras

ALIAS = "dsv4-libs"
INSTRUCTOR = "instructor==1.17.0"
DSPY = "dspy==3.4.1"
HAYSTACK = "haystack-ai==3.4.1"
# The integrations require llama-cpp-python, which the `llama_cpp` alias stands in for: installed without it.
HAYSTACK_CHAT = "llama-cpp-haystack==3.0.2"
HAYSTACK_TEXT = "llama-cpp-haystack==2.3.0"  # the last release with LlamaCppGenerator (deprecated there, gone in 3.0)
LLAMAINDEX = "llama-index-llms-llama-cpp==0.7.0"


class Weather(BaseModel):
    """Weather in a city."""

    city: Literal["Paris", "Oslo"]
    days: int = Field(ge=1, le=7)
    rain: bool


@pytest.fixture(scope="module")
def server(real_vocab_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(real_vocab_path, str(tmp_path_factory.mktemp("server") / "server.log"), "--alias", ALIAS)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def child_env(**values: str) -> dict[str, str]:
    """What a child needs: its values, and no library reaching the network (telemetry, model catalogues)."""
    return {**values, "HAYSTACK_TELEMETRY_ENABLED": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "true"}


def results_of(out: str) -> dict[str, Any]:
    """The child's last stdout line: its findings as JSON."""
    return dict(json.loads(out.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------- instructor

INSTRUCTOR_ON_LLAMA = """
import json, os
import llama_dsv4.compat
llama_dsv4.compat.install()
import instructor, llama_cpp
from typing import Literal
from pydantic import BaseModel, ConfigDict, Field

class User(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)

class StrictUser(User):
    model_config = ConfigDict(extra="forbid")  # no undeclared keys: the answer closes on random weights

llama = llama_cpp.Llama(model_path=os.environ["MODEL"], n_ctx=1024, verbose=False)
done = {}
msgs = [{"role": "user", "content": "Extract: Jason is 25 years old."}]
raw = llama.create_chat_completion_openai_v1(messages=msgs, max_tokens=3)
from openai.types.chat import ChatCompletion, ChatCompletionChunk
assert isinstance(raw, ChatCompletion), type(raw)
assert all(isinstance(c, ChatCompletionChunk) for c in llama.create_chat_completion_openai_v1(
    messages=msgs, max_tokens=3, stream=True))
# instructor's documented way for llama-cpp-python: patch the OpenAI-shaped create of a Llama
for mode, model in ((instructor.Mode.TOOLS, User), (instructor.Mode.JSON_SCHEMA, StrictUser)):
    create = instructor.patch(create=llama.create_chat_completion_openai_v1, mode=mode)
    user = create(messages=msgs, response_model=model, max_retries=0, max_tokens=200, temperature=0.8, seed=3)
    assert isinstance(user, model), type(user)
    done[mode.name] = user.model_dump()
    parts = list(create(messages=msgs, response_model=instructor.Partial[model], stream=True, max_retries=0,
                        max_tokens=200, temperature=0.8, seed=3))
    done[mode.name + "_partial"] = parts[-1].model_dump()
print(json.dumps(done))
"""


def test_instructor_patches_create_chat_completion_openai_v1(real_vocab_path: str) -> None:
    out = run_python(INSTRUCTOR_ON_LLAMA, site_dir(INSTRUCTOR), env=child_env(MODEL=real_vocab_path)).stdout
    done = results_of(out)
    for key in ("TOOLS", "JSON_SCHEMA", "TOOLS_partial", "JSON_SCHEMA_partial"):
        assert len(done[key]["name"]) <= 8 and 0 <= done[key]["age"] <= 120, done


INSTRUCTOR_ON_SERVER = """
import json, os
import instructor, openai
from typing import Literal
from pydantic import BaseModel, ConfigDict, Field

class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no undeclared keys: the answer closes on random weights
    city: Literal["Paris", "Oslo"]
    days: int = Field(ge=1, le=7)

client = openai.OpenAI(base_url=os.environ["URL"], api_key=os.environ["KEY"], max_retries=0)
done = {}
for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
    ic = instructor.from_openai(client, mode=mode)
    w, raw = ic.chat.completions.create_with_completion(
        model=os.environ["ALIAS"], messages=[{"role": "user", "content": "Weather in Oslo?"}], response_model=Weather,
        max_retries=0, max_tokens=200, temperature=0.8, seed=5)
    assert isinstance(w, Weather)
    done[mode.name] = [w.model_dump(), raw.choices[0].finish_reason]
print(json.dumps(done))
"""


def test_instructor_on_the_server(server: Server) -> None:
    env = child_env(URL=server.url + "/v1", KEY=KEY, ALIAS=ALIAS)
    done = results_of(run_python(INSTRUCTOR_ON_SERVER, site_dir(INSTRUCTOR), env=env).stdout)
    assert done["TOOLS"][1] == "tool_calls" and done["JSON_SCHEMA"][1] == "stop"
    for w, _ in done.values():
        Weather.model_validate({**w, "rain": True})


# ---------------------------------------------------------------------------------------------- DSPy

DSPY_ON_SERVER = """
import json, os, warnings
from typing import Literal
import dspy
from dspy.lm15 import AccessPolicy, ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider

url, key, alias = os.environ["URL"], os.environ["KEY"], os.environ["ALIAS"]
done = {}
# any OpenAI-compatible server, through LiteLLM: plain text
lm = dspy.LM("openai/" + alias, api_base=url, api_key=key, max_tokens=4, temperature=0, cache=False)
done["text"] = lm("Hello")

# DSPy's declaration of an OpenAI-compatible server that honours JSON schemas: DSPy's JSON adapter (its fallback
# when the model does not answer in its chat format, as random weights do not) then sends the signature's schema
register_provider(ProviderDefinition.chat(AccessPolicy(provider="llama-dsv4", base_url=url),
                                          compat=OpenAIChatCompat.preset("openai")),
                  supports=ModelSupport(response_schema=True))
lm = dspy.LM("llama-dsv4/" + alias, api_key=key, max_tokens=200, temperature=0.8, cache=False)
dspy.configure(lm=lm)

class QA(dspy.Signature):
    \"\"\"Answer the question.\"\"\"
    question: str = dspy.InputField()
    answer: bool = dspy.OutputField()
    level: Literal["low", "high"] = dspy.OutputField()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pred = dspy.Predict(QA)(question="Is 2 + 2 four?")
last = lm.history[-1]
done["prediction"] = [pred.answer, pred.level]
done["response_format"] = "response_format" in last["kwargs"]
done["finish_reason"] = last["response"].finish_reason
print(json.dumps(done))
"""


def test_dspy_predict_against_the_server(server: Server, tmp_path: Any) -> None:
    env = child_env(URL=server.url + "/v1", KEY=KEY, ALIAS=ALIAS, DSPY_CACHEDIR=str(tmp_path / "dspy"))
    done = results_of(run_python(DSPY_ON_SERVER, site_dir(DSPY), env=env).stdout)
    (text,) = done["text"]
    assert isinstance(text, str) and text
    answer, level = done["prediction"]
    assert isinstance(answer, bool) and level in ("low", "high")
    assert done["response_format"] and done["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- Haystack

HAYSTACK_CHAT_CODE = """
import asyncio, json, os
import llama_dsv4.compat
llama_dsv4.compat.install()
from haystack.dataclasses import ChatMessage
from haystack.tools import Tool
from haystack_integrations.components.generators.llama_cpp import LlamaCppChatGenerator

model = os.environ["MODEL"]
done = {}
try:
    LlamaCppChatGenerator(model=model, chat_handler_name="Llava15ChatHandler", model_clip_path="mmproj.gguf").warm_up()
except NotImplementedError as e:  # llama_cpp.llama_chat_format.ChatFormatUnavailable
    done["llava"] = str(e)
gen = LlamaCppChatGenerator(model=model, n_ctx=1024, n_batch=64, model_kwargs={"verbose": False},
                            generation_kwargs={"max_tokens": 6, "temperature": 0.0})
gen.warm_up()
msgs = [ChatMessage.from_system("Be brief."), ChatMessage.from_user("Hi")]
reply = gen.run(messages=msgs)["replies"][0]
chunks = []
streamed = gen.run(messages=msgs, streaming_callback=chunks.append)["replies"][0]
later = asyncio.run(gen.run_async(messages=msgs))["replies"][0]
done["text"] = [reply.text, streamed.text, "".join(c.content for c in chunks), later.text, reply.meta["finish_reason"]]

tool = Tool(name="get_weather", description="Weather in a city", function=lambda city, days: f"{city}: sunny",
            parameters={"type": "object", "required": ["city", "days"], "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}}})
forced = {"max_tokens": 200, "temperature": 0.8, "seed": 2,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
msg = gen.run(messages=[ChatMessage.from_user("Weather in Paris?")], tools=[tool], generation_kwargs=forced)
msg = msg["replies"][0]
done["tool"] = [[c.tool_name, c.arguments] for c in msg.tool_calls] + [msg.meta["finish_reason"]]
print(json.dumps(done))
"""


def test_haystack_llamacpp_chat_generator(real_vocab_path: str) -> None:
    site = site_dir(HAYSTACK, no_deps=[HAYSTACK_CHAT])
    done = results_of(run_python(HAYSTACK_CHAT_CODE, site, env=child_env(MODEL=real_vocab_path)).stdout)
    assert "no vision input" in done["llava"]  # an image handler cannot apply, and says why
    reply, streamed, chunks, later, finish = done["text"]
    assert reply and reply == streamed == chunks == later and finish == "length"  # temperature 0: one answer
    (name, args), finish = done["tool"]
    assert name == "get_weather" and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    assert finish == "tool_calls"


HAYSTACK_TEXT_CODE = """
import json, os, warnings
import llama_dsv4.compat
llama_dsv4.compat.install()
from haystack_integrations.components.generators.llama_cpp import LlamaCppGenerator

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # its own deprecation notice
    gen = LlamaCppGenerator(model=os.environ["MODEL"], n_ctx=512, n_batch=64, model_kwargs={"verbose": False},
                            generation_kwargs={"max_tokens": 6, "temperature": 0.0})
gen.warm_up()
out = gen.run("Hello")
print(json.dumps([out["replies"], out["meta"][0]["usage"]]))
"""


def test_haystack_llamacpp_generator(real_vocab_path: str) -> None:
    site = site_dir(HAYSTACK, no_deps=[HAYSTACK_TEXT])
    out = run_python(HAYSTACK_TEXT_CODE, site, env=child_env(MODEL=real_vocab_path)).stdout
    (reply,), usage = json.loads(out.strip().splitlines()[-1])
    assert reply and usage["completion_tokens"] == 6


# ---------------------------------------------------------------------------------------------- LlamaIndex

LLAMAINDEX_CODE = """
import json, os
import llama_dsv4.compat
llama_dsv4.compat.install()
from llama_index.core.llms import ChatMessage
from llama_index.llms.llama_cpp import LlamaCPP

llm = LlamaCPP(model_path=os.environ["MODEL"], temperature=0.0, max_new_tokens=6, context_window=512,
               model_kwargs={"n_ctx": 512}, verbose=False)
done = llm.complete("Hello")
chat = llm.chat([ChatMessage(role="user", content="Hello")])
print(json.dumps([llm.metadata.context_window, done.text, "".join(r.delta for r in llm.stream_complete("Hello")),
                  chat.message.content]))
"""


def test_llamaindex_llamacpp(real_vocab_path: str) -> None:
    site = site_dir(no_deps=[LLAMAINDEX])  # llama-index-core is a dev dependency
    out = run_python(LLAMAINDEX_CODE, site, env=child_env(MODEL=real_vocab_path)).stdout
    window, text, streamed, chat = json.loads(out.strip().splitlines()[-1])
    assert window == 512 and text and streamed == text and isinstance(chat, str)


# ---------------------------------------------------------------------------------------------- the OpenAI SDK


def test_openai_sdk_parse_and_stream_helpers(client: Any) -> None:
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    common: dict[str, Any] = dict(model=ALIAS, messages=msgs, temperature=0.8, seed=1, max_tokens=200)
    for parse in (client.chat.completions.parse, client.beta.chat.completions.parse):
        r = parse(response_format=Weather, **common)
        assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Weather)
    parsed = r.choices[0].message.parsed

    tool = openai.pydantic_function_tool(Weather)  # strict: the SDK parses the arguments into the model
    forced = {"type": "function", "function": {"name": "Weather"}}
    r = client.chat.completions.parse(tools=[tool], tool_choice=forced, **common)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, Weather)

    for stream in (client.chat.completions.stream, client.beta.chat.completions.stream):
        with stream(response_format=Weather, **common) as s:
            kinds = [e.type for e in s]
            final = s.get_final_completion()
        assert {"chunk", "content.delta", "content.done"} <= set(kinds)
        assert final.choices[0].message.parsed == parsed  # the same seed streamed: the same answer

    with client.chat.completions.stream(tools=[tool], tool_choice=forced, **common) as s:
        done = [e for e in s if e.type == "tool_calls.function.arguments.done"]
        final = s.get_final_completion()
    assert [e.name for e in done] == ["Weather"] and isinstance(done[0].parsed_arguments, Weather)
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == call.function.parsed_arguments

    with client.chat.completions.stream(model=ALIAS, messages=msgs, max_tokens=4) as s:  # plain text
        text = "".join(e.delta for e in s if e.type == "content.delta")
        with pytest.raises(openai.LengthFinishReasonError):  # the SDK refuses to "parse" an answer cut by length
            s.get_final_completion()
    assert text


# ---------------------------------------------------------------------------------------------- langchain-openai


def test_langchain_openai_tools_and_structured_output(server: Server) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=server.url + "/v1", api_key=KEY, model=ALIAS, temperature=0.8, seed=4, max_tokens=200, max_retries=0
    )
    for choice in ("Weather", "any", "required", True):  # LangChain's spellings of a forced call
        msg = chat.bind_tools([Weather], tool_choice=choice).invoke("Weather in Oslo?")
        (call,) = msg.tool_calls
        assert call["name"] == "Weather" and msg.response_metadata["finish_reason"] == "tool_calls"
        Weather.model_validate(call["args"])
    chunks = list(chat.bind_tools([Weather], tool_choice="Weather").stream("Weather in Oslo?"))
    whole = chunks[0]
    for c in chunks[1:]:
        whole += c
    assert [c["name"] for c in whole.tool_calls] == ["Weather"]
    follow = [HumanMessage("Weather in Oslo?"), msg, ToolMessage("sunny", tool_call_id=call["id"])]
    assert isinstance(chat.bind_tools([Weather]).invoke(follow, max_tokens=4).content, str)

    for method in ("json_schema", "function_calling"):
        out = chat.with_structured_output(Weather, method=method, include_raw=True).invoke("Weather in Paris?")
        assert out["parsing_error"] is None and isinstance(out["parsed"], Weather), out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = list(chat.with_structured_output(Weather, method="json_schema").stream("Weather in Paris?"))
    assert isinstance(streamed[-1], Weather)
