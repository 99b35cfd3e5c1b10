"""Request bodies, checked with pydantic: types and ranges of every field we use. Fields we do not know are
ignored, as llama-cpp-python's server and OpenAI-compatible servers generally do (clients send many)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

INT32 = 2**31 - 1
MAX_CHOICES = 16  # choices per request: n times the prompts (server/choices.py)
_cfg = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Body(BaseModel):
    model_config = _cfg


class _Open(BaseModel):  # nested objects whose other fields travel on unchanged
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0, le=INT32)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    typical_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=INT32)] | None = None
    repeat_penalty: Annotated[StrictFloat, Field(gt=0.0, le=100.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    mirostat_mode: Annotated[StrictInt, Field(ge=0, le=2)] = 0
    mirostat_tau: Annotated[StrictFloat, Field(ge=0.0, le=100.0)] = 5.0
    mirostat_eta: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 0.1
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=INT32)] = 1  # choices per prompt (bounded in server/choices.py)
    user: StrictStr | None = None
    grammar: StrictStr | None = None


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or a list of them: checked by _prompt_forms
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: StrictStr | None = None
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=1)] | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt_forms(cls, v: Any) -> Any:
        """OpenAI's four forms, checked in one pass (a union of list types would make pydantic report every item
        of a long list against every form: seconds and gigabytes for a large body), at most MAX_CHOICES prompts."""
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(
                "the prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            )
        if isinstance(v[0], (str, list)) and len(v) > MAX_CHOICES:
            raise ValueError(f"{len(v)} prompts: this server answers at most {MAX_CHOICES} choices per request")
        for i, x in enumerate(v):
            if isinstance(v[0], str) and not isinstance(x, str):
                raise ValueError(f"item {i} is not a string, as the first is (a list of prompts has one form)")
            if isinstance(v[0], list) and not (isinstance(x, list) and x and _ids(x)):
                raise ValueError(f"item {i} is not a non-empty list of token ids (integers from 0 to {INT32})")
        if not isinstance(v[0], (str, list)) and not _ids(v):
            raise ValueError(f"a list of token ids holds integers from 0 to {INT32}")
        return v


def _ids(v: list[Any]) -> bool:
    return all(type(x) is int and 0 <= x <= INT32 for x in v)


class FunctionDef(_Open):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(_Open):
    name: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class Message(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0, le=INT32)] | None = None
    tools: list[Tool] | None = None
    tool_choice: StrictStr | NamedToolChoice | None = None  # a bare string: none/auto/required/any or a tool's name
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    reasoning_format: Literal["deepseek", "none", "auto", "deepseek-legacy"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: StrictBool | dict[str, Any] | None = None
    reasoning_effort: StrictStr | None = None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    content: StrictStr | None = None
    input: StrictStr | None = None  # llama-cpp-python's /extras/tokenize
    add_special: StrictBool | None = None
    parse_special: StrictBool = True
    with_pieces: StrictBool = False


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0, le=INT32)]]


class EmbeddingRequest(_Body):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
