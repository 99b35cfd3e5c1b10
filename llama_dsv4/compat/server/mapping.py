"""What llama-cpp-python's server settings mean on llama-dsv4: each one becomes a setting of our server
(server/settings.py) or a `Llama` keyword, or is accepted with a note saying why it does not apply, or is refused
where going on without it would answer something other than what it asks for (a model computed differently).

Only settings given (on the command line, in the environment or in the config file) are noted or refused; their
defaults are llama-cpp-python's, so an unchanged command line means what it meant there (the CPU unless
n_gpu_layers says otherwise, a 2048-token context, mlock, every position's logits, verbose logs, port 8000).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ...flags import fit_threads, gpu_layers_device
from ...server.models import Model
from ...server.settings import Settings as ServerConfig
from ...server.settings import SettingsError
from .settings import LLAMA_DEFAULT_SEED, ModelSettings, ServerSettings

# accepted; what they ask for has no effect here (a note is logged at startup)
_NO_EFFECT = {
    "split_mode": "one device per process on this build",
    "main_gpu": "one device per process on this build",
    "mul_mat_q": "ggml chooses its matrix kernels",
    "offload_kqv": "the context lives on the device that computes",
    "numa": "NUMA placement is left to the OS",
    "embedding": "DeepSeek V4 has no embedding output: /v1/embeddings answers 501",
    "clip_model_path": "DeepSeek V4 reads text only (no vision projector)",
    "type_v": "DeepSeek V4's attention has no separate value cache (keys are values)",
    "interrupt_requests": "requests wait for the model in turn; a new request never cuts a running stream",
}
# refused: the model would compute something other than what they ask for
_REFUSED = {
    "vocab_only": "a model loaded without its weights cannot answer completions",
    "kv_overrides": "metadata overrides are not supported, so the model would not run as they ask",
    "lora_base": "LoRA adapters are not supported, so answers would come from the base model",
    "lora_path": "LoRA adapters are not supported, so answers would come from the base model",
    "rope_scaling_type": "this engine uses the GGUF's RoPE scaling, so positions would not be what it asks",
    "rope_freq_scale": "this engine uses the GGUF's RoPE scaling, so positions would not be what it asks",
    "yarn_ext_factor": "this engine uses the GGUF's YaRN settings",
    "yarn_attn_factor": "this engine uses the GGUF's YaRN settings",
    "yarn_beta_fast": "this engine uses the GGUF's YaRN settings",
    "yarn_beta_slow": "this engine uses the GGUF's YaRN settings",
    "yarn_orig_ctx": "this engine uses the GGUF's YaRN settings",
    "hf_pretrained_model_name_or_path": "the tokenizer is the GGUF's; a Hugging Face tokenizer cannot replace it",
}
# chat formats that need a vision projector, and the Hugging Face tokenizer one
VISION_FORMATS = frozenset(
    {
        "llava-1-5",
        "llava-1-6",
        "obsidian",
        "mtmd",
        "gemma4",
        "moondream",
        "nanollava",
        "llama-3-vision-alpha",
        "minicpm-v-2.6",
        "qwen2.5-vl",
    }
)
CACHE_TYPES = {0: 0, 1: 1}  # GGML_TYPE_F32, GGML_TYPE_F16: the cache types the engine has
MAX_TOKENIZER_CONFIG = 16 << 20  # bytes of a tokenizer_config.json (real ones: some 10 KB to 1 MB)


def _changed(m: ModelSettings | ServerSettings, name: str) -> bool:
    """Given, and not llama-cpp-python's default."""
    return name in m.model_fields_set and getattr(m, name) != type(m).model_fields[name].default


def model_config(m: ModelSettings, server: ServerSettings) -> Model:
    """One model of llama-cpp-python's server as one of ours. Raises SettingsError for what cannot be honoured."""
    name = m.model_alias or m.model  # llama-cpp-python's default name: the model path as given
    where = f"model {name!r}: "
    notes: list[str] = []
    for field, why in _REFUSED.items():
        if _changed(m, field):
            raise SettingsError(f"{where}{field}={getattr(m, field)!r} cannot be honoured: {why}")
    for field, why in _NO_EFFECT.items():
        owner: ModelSettings | ServerSettings = server if field in ServerSettings.model_fields else m
        # interrupt_requests: its default is what does not apply here, so asking for it is noted
        if _changed(owner, field) or (
            field == "interrupt_requests" and field in owner.model_fields_set and owner.interrupt_requests
        ):
            notes.append(f"{field}={getattr(owner, field)!r}: accepted, no effect ({why})")

    s = ServerConfig()
    if m.hf_model_repo_id:
        if m.hf_model_repo_id.count("/") != 1:
            raise SettingsError(f"{where}hf_model_repo_id takes user/model, got {m.hf_model_repo_id!r}")
        s.hf_repo, s.hf_file, s.hf_token = m.hf_model_repo_id, m.model, os.environ.get("HF_TOKEN")
    elif not os.path.isfile(m.model):
        raise SettingsError(f"{where}no such file: {m.model}")
    else:
        s.model = m.model
    s.alias = name
    s.n_ctx, s.n_batch, s.n_ubatch = m.n_ctx, m.n_batch, min(m.n_ubatch, m.n_batch)
    s.device, note = gpu_layers_device(m.n_gpu_layers, "auto")
    if note and "n_gpu_layers" in m.model_fields_set:
        notes.append(note.replace("--n-gpu-layers", "n_gpu_layers"))
    s.n_gpu_layers = m.n_gpu_layers
    s.flash_attn, s.use_mmap, s.use_mlock, s.logits_all = m.flash_attn, m.use_mmap, m.use_mlock, m.logits_all
    s.rpc_servers = m.rpc_servers  # a split across RPC servers (docs/rpc.md), tensor_split its shares
    if m.tensor_split is not None and not m.rpc_servers:
        notes.append(
            f"tensor_split={m.tensor_split!r}: accepted, no effect (without rpc_servers: one device per process)"
        )
    elif m.tensor_split is not None:
        s.tensor_split = list(m.tensor_split)
    s.seed = None if m.seed in (-1, LLAMA_DEFAULT_SEED) else m.seed
    if m.type_k is not None:
        if m.type_k in CACHE_TYPES:
            s.type_k = CACHE_TYPES[m.type_k]
        else:
            notes.append(f"type_k={m.type_k}: the cache is kept in f16 (this engine has f16 and f32 caches)")
    # threads: llama-cpp-python's defaults are ours (about the physical cores); given counts are fitted to the CPUs
    threads = argparse.Namespace(
        n_threads=m.n_threads if "n_threads" in m.model_fields_set else None,
        n_threads_batch=m.n_threads_batch if "n_threads_batch" in m.model_fields_set else None,
    )
    s.n_threads, s.n_threads_batch = fit_threads(threads, notes)
    s.verbose = m.verbose
    s.chat_template_kwargs = dict(m.chat_template_kwargs or {})
    s.llama_extra = _llama_keywords(m, where)
    if m.chat_format == "hf-tokenizer-config":
        s.chat_template = _tokenizer_config_template(m, where)
    if m.cache:
        s.prompt_cache = (m.cache_type, m.cache_size)
    if m.draft_model is None and _changed(m, "draft_model_num_pred_tokens"):
        notes.append("draft_model_num_pred_tokens: accepted, no effect (used with draft_model)")
    if m.hf_tokenizer_config_path and m.chat_format != "hf-tokenizer-config":
        notes.append("hf_tokenizer_config_path: accepted, no effect (used with chat_format hf-tokenizer-config)")

    # the server (shared by the models)
    s.host, s.port = server.host, server.port
    s.ssl_keyfile, s.ssl_certfile = server.ssl_keyfile, server.ssl_certfile
    if server.ssl_keyfile and not server.ssl_certfile:
        raise SettingsError("HTTPS needs ssl_certfile as well as ssl_keyfile")
    s.api_keys = [server.api_key] if server.api_key else []  # one key, commas and all
    s.root_path = server.root_path.rstrip("/")
    s.sse_ping = not server.disable_ping_events
    s.repeat_penalty = 1.1  # llama-cpp-python's server's default for requests (llama-server's is 1.0)
    s.notes = notes
    return Model(name, s)


def _llama_keywords(m: ModelSettings, where: str) -> dict[str, Any]:
    """The `Llama(...)` keywords llama-server's flags do not cover."""
    kw: dict[str, Any] = {}
    if m.chat_format is not None and m.chat_format != "hf-tokenizer-config":
        if m.chat_format in VISION_FORMATS:
            raise SettingsError(
                f"{where}chat_format {m.chat_format!r} is a vision format: DeepSeek V4 reads text only "
                "(leave chat_format out to use the model's own template)"
            )
        if m.chat_format == "hf-autotokenizer":
            raise SettingsError(
                f"{where}chat_format 'hf-autotokenizer' renders with a Hugging Face tokenizer, which cannot replace "
                "the GGUF's; use chat_format hf-tokenizer-config with hf_tokenizer_config_path, or leave it out"
            )
        kw["chat_format"] = m.chat_format
    if _changed(m, "last_n_tokens_size"):
        kw["last_n_tokens_size"] = m.last_n_tokens_size
    if m.rope_freq_base:
        kw["rope_freq_base"] = m.rope_freq_base
    if m.draft_model is not None:
        from ..speculative import LlamaPromptLookupDecoding

        kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=m.draft_model_num_pred_tokens)
    return kw


def read_bounded(path: str, limit: int, what: str, shown_limit: str) -> bytes:
    """The bytes of an untrusted file of at most `limit` bytes (`shown_limit` in words); SettingsError("{what}: ...")
    if it cannot be read or is larger."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SettingsError(f"{what}: {e.strerror}") from None
    if len(data) > limit:
        raise SettingsError(f"{what}: over {shown_limit}")
    return data


def _tokenizer_config_template(m: ModelSettings, where: str) -> str:
    """chat_format hf-tokenizer-config: the chat template of hf_tokenizer_config_path (a tokenizer_config.json)."""
    path = m.hf_tokenizer_config_path
    if not path:
        raise SettingsError(f"{where}chat_format hf-tokenizer-config needs hf_tokenizer_config_path")
    what = f"{where}hf_tokenizer_config_path {path}"
    data = read_bounded(path, MAX_TOKENIZER_CONFIG, what, f"{MAX_TOKENIZER_CONFIG >> 20} MiB")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SettingsError(f"{where}hf_tokenizer_config_path {path}: not JSON ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise SettingsError(f"{where}hf_tokenizer_config_path {path}: no chat_template string in it")
    return template
