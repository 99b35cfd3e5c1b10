"""llama-cpp-python's server settings (`llama_cpp.server.settings` under the alias): the same classes, field names,
types and defaults as llama-cpp-python 0.3.36, so its command-line flags, environment variables and config files
keep their meaning. What each setting does on llama-dsv4 is in mapping.py.

As there (pydantic-settings), constructing `Settings(...)`, `ModelSettings(...)` or `ServerSettings(...)` fills the
fields not given from environment variables of the same name (any case; lists and objects as JSON); a config file
(`ConfigFileSettings`, validated from JSON or YAML) does not read the environment. Unknown keys are errors.
"""

from __future__ import annotations

import json
import os
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
_CPUS = os.cpu_count() or 1


def env_values(cls: type[BaseModel], environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fields of `cls` set in the environment (names in any case), lists and objects decoded from JSON."""
    env = {k.lower(): v for k, v in (os.environ if environ is None else environ).items()}
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name not in env:
            continue
        value: Any = env[name]
        if _is_structured(info.annotation):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"environment variable {name.upper()}: not JSON") from None
        out[name] = value
    return out


def _is_structured(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        return True
    return any(_is_structured(a) for a in typing.get_args(annotation)) if origin is not None else False


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        super().__init__(**{**env_values(type(self)), **data})


class ModelSettings(_Base):
    """One model of the server and how it is loaded (llama-cpp-python's `Llama(...)` keywords, mostly)."""

    model: str = Field(description="path of the GGUF file (with hf_model_repo_id: the file name or glob in the repo)")
    model_alias: str | None = Field(default=None, description="the name requests use (default: `model` as given)")
    n_gpu_layers: int = Field(default=0, ge=-1, description="0: run on the CPU; -1 or N: the whole model on the GPU")
    split_mode: int = Field(default=1, description="how to split over GPUs (one device per process here)")
    main_gpu: int = Field(default=0, ge=0, description="main GPU (one device per process here)")
    tensor_split: list[float] | None = Field(
        default=None, description="with rpc_servers: shares of the layers, the servers in order, then this machine"
    )
    vocab_only: bool = Field(default=False, description="load only the vocabulary (refused: nothing to serve)")
    use_mmap: bool = Field(default=True, description="map the model file instead of reading it")
    use_mlock: bool = Field(default=True, description="lock the weights in RAM (a failure warns)")
    kv_overrides: list[str] | None = Field(default=None, description="metadata overrides (refused: not supported)")
    rpc_servers: str | None = Field(
        default=None, description="host:port,... of llama-dsv4-rpc-server processes holding a share of the layers"
    )
    seed: int = Field(default=LLAMA_DEFAULT_SEED, description="random seed; -1: random")
    n_ctx: int = Field(default=2048, ge=0, description="context size (0: the model's trained context)")
    n_batch: int = Field(default=512, ge=1, description="logical batch size")
    n_ubatch: int = Field(default=512, ge=1, description="physical batch size")
    n_threads: int = Field(default=max(_CPUS // 2, 1), ge=1, description="threads (-1: all CPUs)")
    n_threads_batch: int = Field(default=max(_CPUS, 1), ge=0, description="threads for prompts (-1: all CPUs)")
    rope_scaling_type: int = Field(default=-1, description="RoPE scaling (refused unless -1: the GGUF's is used)")
    rope_freq_base: float = Field(default=0.0, description="RoPE base frequency (0: the model's)")
    rope_freq_scale: float = Field(default=0.0, description="RoPE frequency scale (refused unless 0)")
    yarn_ext_factor: float = Field(default=-1.0, description="YaRN (refused unless default: the GGUF's is used)")
    yarn_attn_factor: float = Field(default=1.0, description="YaRN (refused unless default)")
    yarn_beta_fast: float = Field(default=32.0, description="YaRN (refused unless default)")
    yarn_beta_slow: float = Field(default=1.0, description="YaRN (refused unless default)")
    yarn_orig_ctx: int = Field(default=0, description="YaRN (refused unless default)")
    mul_mat_q: bool = Field(default=True, description="a llama.cpp kernel choice (no effect here)")
    logits_all: bool = Field(default=True, description="keep every position's logits (prompt logprobs with echo)")
    embedding: bool = Field(default=False, description="embeddings (DeepSeek V4 has none: /v1/embeddings is 501)")
    offload_kqv: bool = Field(default=True, description="the context on the GPU (it lives where the model runs)")
    flash_attn: bool = Field(default=False, description="attention in f16 as llama.cpp's flash-attention path")
    last_n_tokens_size: int = Field(default=64, ge=0, description="tokens the repeat penalty looks back over")
    lora_base: str | None = Field(default=None, description="LoRA base model (refused: adapters not supported)")
    lora_path: str | None = Field(default=None, description="LoRA adapter (refused: adapters not supported)")
    numa: bool | int = Field(default=False, description="NUMA (placement is left to the OS)")
    chat_format: str | None = Field(default=None, description="chat format name (default: the GGUF's template)")
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="template variables (JSON)")
    clip_model_path: str | None = Field(default=None, description="vision projector (DeepSeek V4 reads text only)")
    cache: bool = Field(default=False, description="keep evaluated prompts' states in a prompt cache")
    cache_type: Literal["ram", "disk"] = Field(default="ram", description="where the prompt cache lives")
    cache_size: int = Field(default=2 << 30, ge=0, description="prompt cache size in bytes")
    hf_tokenizer_config_path: str | None = Field(default=None, description="tokenizer_config.json (its template)")
    hf_pretrained_model_name_or_path: str | None = Field(default=None, description="HF tokenizer (refused)")
    hf_model_repo_id: str | None = Field(default=None, description="Hugging Face repo to download `model` from")
    draft_model: str | None = Field(default=None, description="speculative decoding: prompt-lookup-decoding")
    draft_model_num_pred_tokens: int = Field(default=10, ge=1, description="tokens the draft model proposes")
    type_k: int | None = Field(default=None, description="key cache type: 1 (f16) or 0 (f32)")
    type_v: int | None = Field(default=None, description="value cache type (DeepSeek V4 has none apart)")
    verbose: bool = Field(default=True, description="log more (the engine's messages, each request)")

    @model_validator(mode="before")
    @classmethod
    def _all_cpus(cls, data: Any) -> Any:
        """-1 threads means every CPU, as there."""
        if isinstance(data, dict):
            for key in ("n_threads", "n_threads_batch"):
                if data.get(key) in (-1, "-1"):
                    data = {**data, key: _CPUS}
        return data


class ServerSettings(_Base):
    """The HTTP server: address, TLS, the API key, streaming and proxy details."""

    host: str = Field(default="localhost", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    ssl_keyfile: str | None = Field(default=None, description="PEM private key for HTTPS")
    ssl_certfile: str | None = Field(default=None, description="PEM certificate for HTTPS")
    api_key: str | None = Field(default=None, description="the key every request must send as a Bearer token")
    interrupt_requests: bool = Field(
        default=True, description="there: a new request cuts a running stream; here requests wait their turn"
    )
    disable_ping_events: bool = Field(default=False, description="no keep-alive comments in streams")
    root_path: str = Field(default="", description="the path prefix behind a reverse proxy")


class Settings(ServerSettings, ModelSettings):
    """The command line's settings: one model and the server."""


class ConfigFileSettings(ServerSettings):
    """A config file: the server's settings and a list of models, chosen by each request's `model`."""

    models: list[ModelSettings] = Field(default=[], description="the models, the first one the default")

    def __init__(self, **data: Any) -> None:  # a config file does not read the environment
        BaseModel.__init__(self, **data)
