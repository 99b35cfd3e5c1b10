"""`Llama`: llama-cpp-python's `llama_cpp.Llama` surface over the deepseek4 engine.

This module is the facade: it owns the API (arguments, defaults, return shapes, errors) and builds what does the
work: the model (model/), the engine context (runner.py), the one sequence it evaluates (sequence.py: tokens,
logits, eval, sample, generate, save/load, the lock), the tokenizer (tokenizer.py), completions (completion.py)
and chat (chat/). It does not import ggml.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import completion as _completion
from .cache import BaseLlamaCache, longest_token_prefix
from .chat.registry import ChatFormatRegistry
from .engine import runtime
from .engine.cpus import fit_count, usable_cpus
from .engine.memory import state_bytes
from .grammar import LlamaGrammar
from .llama_types import CreateCompletionResponse, CreateCompletionStreamResponse, CreateEmbeddingResponse
from .logprobs import log_softmax
from .model.loader import load_model
from .moe import MoEConfig, parse_hot_count, parse_prefetch
from .runner import Runner
from .sampling import LogitsProcessorList, StoppingCriteriaList
from .sampling.constrained import grammar_state
from .sequence import Sequence as TokenSequence
from .speculative import check_draft_n_max
from .state import LlamaState
from .tokenizer import BaseLlamaTokenizer, DSV4Tokenizer, LlamaTokenizer

__all__ = ["LLAMA_DEFAULT_SEED", "Llama", "LlamaState"]

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
_CACHE_TYPE_NAMES = {0: "f32", 1: "f16"}  # GGML_TYPE_F32, GGML_TYPE_F16
_ACCEPTED = (
    "n_gpu_layers",
    "split_mode",
    "main_gpu",
    "kv_overrides",
    "rope_scaling_type",
    "pooling_type",
    "attention_type",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
    "offload_kqv",
    "op_offload",
    "swa_full",
    "no_perf",
    "lora_base",
    "lora_scale",
    "lora_path",
    "numa",
    "spm_infill",
)


class _Params:
    """The constructor's view that third parties read (`llm.context_params.n_ctx`, `llm.model_params`)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class _OfSequence:
    """A Llama attribute that is its sequence's (llm.n_tokens, llm.input_ids, llm.n_threads, ...): read and written
    through, as llama-cpp-python's code and its users do."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else getattr(obj._seq, self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj._seq, self.field, value)


def _arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A method's arguments from its `locals()` taken first thing, without self: forwards llama-cpp-python's long
    keyword signatures without writing their lists again."""
    return {k: v for k, v in frame_locals.items() if k != "self"}


class Llama:
    """Load a deepseek4 GGUF and run it, with llama-cpp-python's API.

    use_mmap=True (the default): the model file is memory-mapped and the weights are its pages, as in llama.cpp. The
    file must not be modified or truncated while a Llama maps it: a truncation is a SIGBUS (the process dies) and an
    in-place overwrite changes the weights under the running model. use_mmap=False reads the weights into memory the
    process owns (RAM for the whole model, counted by the n_ctx memory check), after which the file may change or
    be removed. The tensors used as indices (the hash-routing table tid2eid) are private copies of the validated
    bytes in both modes. use_mlock locks the weights in RAM (mapped pages or the memory read into); MoE expert
    residency (moe_hot_count) manages pages of the mapping and needs use_mmap=True.
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_gpu_layers: int = 0,
        split_mode: int = 1,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        kv_unified: bool = False,
        batch_wait_ms: float = 2.0,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        rope_scaling_type: int | None = -1,
        pooling_type: int = -1,
        attention_type: int = -1,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: bool = False,
        op_offload: bool | None = None,
        swa_full: bool | None = None,
        no_perf: bool = False,
        last_n_tokens_size: int = 64,
        lora_base: str | None = None,
        lora_scale: float = 1.0,
        lora_path: str | None = None,
        numa: bool | int = False,
        chat_format: str | None = None,
        chat_handler: Any = None,
        draft_model: Any = None,
        spec_type: str | None = None,
        spec_draft_n_max: int = 2,
        tokenizer: BaseLlamaTokenizer | None = None,
        type_k: int | None = None,
        type_v: int | None = None,
        spm_infill: bool = False,
        verbose: bool = True,
        device: str = "auto",
        moe_hot_count: int | str | list[int] | None = None,
        moe_hot_budget_mib: float | None = None,
        moe_stats_path: str | None = None,
        moe_release_cold: bool = False,
        moe_prefetch: bool | str = "auto",
        moe_device_experts: int = 0,
        rpc_servers: str | None = None,
        rpc_timeout: float = 120.0,
        **kwargs: Any,
    ) -> None:
        """Load a deepseek4 GGUF and make a context (n_seq_max sequences, one by default) for it.

        The keywords are llama-cpp-python's, plus `device` and the `moe_*` ones of this engine. Keywords of
        llama-cpp-python's constructor that this engine does not use are accepted, as llama-cpp-python accepts
        them, and change nothing: each says so below. Unknown keywords (LangChain's `n_parts`, `f16_kv`, ...) are
        ignored, with a note on stderr when `verbose`.

        Args:
            model_path: The GGUF file (str or os.PathLike); any shard of a split set
                (`name-0000i-of-0000N.gguf`) opens the whole set. The file is validated completely before use.
            n_gpu_layers: Not used: the whole model runs on `device` (no partial offload). Default 0.
            split_mode: Not used (one device). Default 1.
            main_gpu: Not used (see `device`). Default 0.
            tensor_split: With rpc_servers, each device's share of the layers: the RPC servers in order, then this
                machine (llama.cpp's --tensor-split order); None: in proportion to their free memory. Without
                rpc_servers, only None or one share. Default None.
            vocab_only: Load the vocabulary and metadata without a context: tokenize(), detokenize() and
                `metadata` work, evaluation raises ValueError. Default False.
            use_mmap: Memory-map the weights, as llama.cpp does: the file must not be modified or truncated while
                mapped (a truncation is a SIGBUS). False reads them into memory the process owns (counted by the
                n_ctx memory check), after which the file may change. Default True.
            use_mlock: Lock the weights in RAM (the mapped pages, or the memory read into); a failure to lock is a
                RuntimeWarning. With `moe_hot_count`, the non-expert weights stay locked and the experts follow
                the hot set. Default False.
            kv_overrides: Not used: the engine reads the model's metadata as the file gives it. Default None.
            seed: Sampling seed. Completions without their own `seed=` draw theirs from a chain started here, so
                the same seed and the same calls give the same tokens; 0 means LLAMA_DEFAULT_SEED, which here is
                a fixed seed like any other, not a random one. Default LLAMA_DEFAULT_SEED (0xFFFFFFFF).
            n_ctx: Positions in the context; 0: the model's training context. ValueError, before anything is
                allocated, when the context state and token buffers do not fit in the available memory (or on
                the device). Default 512.
            n_batch: Largest number of tokens eval() hands to the engine at once (at most n_ctx); under 32 is a
                RuntimeWarning (slow). Default 512.
            n_ubatch: Largest number of tokens computed in one graph (at most n_batch). Default 512.
            n_seq_max: Sequences in the context (llama.cpp's name), 1 to 256: this Llama is sequence 0 and
                `slot(i)` a Llama over sequence i. Completions running at once on different sequences are
                evaluated together, one graph per step for all of them (continuous batching, docs/batching.md);
                see create_completions(). Each sequence holds up to n_ctx positions, and the memory check counts
                n_seq_max contexts. Default 1.
            kv_unified: With n_seq_max > 1, the sequences share n_ctx: each may hold up to n_ctx positions, and
                those of the sequences a completion runs on stay within n_ctx together (an evaluation that would
                exceed it is a ValueError, "Context size has been exceeded"). Each sequence's state is still
                allocated for n_ctx. Default False.
            batch_wait_ms: With n_seq_max > 1, how long a step at least waits for the next token of every
                sequence a completion runs on, so that they are evaluated together (a quarter of the previous
                step's compute time when that is longer; a single running sequence never waits, 0 never waits);
                0 to 60000. Default 2.0.
            n_threads: Threads for generation (one token at a time). None, 0 or -1: half the usable CPUs, as
                llama-cpp-python; more than the CPUs this process may use is lowered to them with a
                RuntimeWarning. While other processes keep the CPUs busy, fewer are used for a while (the thread
                governor; LLAMA_DSV4_GOVERNOR=off turns it off). Default None.
            n_threads_batch: Threads for prompts (several tokens at once). None, 0 or -1: all usable CPUs;
                clamped as n_threads. Default None.
            rope_scaling_type: Not used: RoPE scaling comes from the model file. Default -1.
            pooling_type: Not used: the model has no embedding output. Default -1.
            attention_type: Not used. Default -1.
            rope_freq_base: 0 keeps the model's; another value overrides the RoPE base of the sliding-window
                layers only (the compressed layers keep their own base), with a RuntimeWarning. Default 0.0.
            rope_freq_scale: Not used: RoPE scaling comes from the model file (the value is only reported in
                `context_params`). Default 0.0.
            yarn_ext_factor: Not used (YaRN settings come from the model file). Default -1.0.
            yarn_attn_factor: Not used (YaRN settings come from the model file). Default 1.0.
            yarn_beta_fast: Not used (YaRN settings come from the model file). Default 32.0.
            yarn_beta_slow: Not used (YaRN settings come from the model file). Default 1.0.
            yarn_orig_ctx: Not used (YaRN settings come from the model file). Default 0.
            logits_all: Keep the logits of every evaluated position in `scores` (n_ctx x n_vocab floats), needed
                for earlier positions' logits and for `echo=True` with `logprobs`; logprobs of generated tokens
                work without it. Default False.
            embedding: Accepted for compatibility: DeepSeek V4 has no embedding output, so embed() and
                create_embedding() raise NotImplementedError with it (RuntimeError without). Default False.
            offload_kqv: Not used (the context state is on `device`). Default True.
            flash_attn: Compute attention as llama.cpp's flash-attention path does (keys and values rounded to
                f16); False computes it in f32 throughout. Default False.
            op_offload: Not used. Default None.
            swa_full: Not used. Default None.
            no_perf: Not used. Default False.
            last_n_tokens_size: How many of the last tokens the repeat, frequency and presence penalties look
                at. Default 64.
            lora_base: Not used: LoRA adapters are not supported (the value is kept as an attribute). Default
                None.
            lora_scale: Not used (no LoRA). Default 1.0.
            lora_path: Not used: LoRA adapters are not supported (the value is kept as an attribute). Default
                None.
            numa: Not used. Default False.
            chat_format: The chat format create_chat_completion() uses: a name in `chat_formats`
                (llama-cpp-python's named formats such as "chatml", our "deepseek-v4", or the model's own
                "chat_template.default" and "chat_template.<name>"). None: the model file's template when it has
                a usable one, else "deepseek-v4". An unknown name fails when chatting. Default None.
            chat_handler: A llama-cpp-python chat completion handler (a callable) used instead of `chat_format`.
                Default None.
            draft_model: A draft model for speculative decoding (llama-cpp-python's LlamaDraftModel, such as
                LlamaPromptLookupDecoding): a callable from the token ids so far to proposed next ids, which are
                evaluated with each sampled token and kept as long as the samples agree with them. Turns on
                logits_all. Default None.
            spec_type: "mtp" (or llama.cpp's spelling "draft-mtp"): speculative decoding with the model's own MTP
                (nextn) block, which drafts tokens that the model verifies several at a time (docs/speculative.md);
                greedy decoding gives exactly the tokens it gives without. Needs a file with the MTP layer and
                n_seq_max=1; not with draft_model. None or "none": off. Default None.
            spec_draft_n_max: Tokens the MTP block drafts per step with spec_type="mtp" (1 to 16). Default 2.
            tokenizer: A tokenizer with llama-cpp-python's BaseLlamaTokenizer interface (LlamaHFTokenizer, ...)
                used by tokenize() and detokenize(), so also for the text that completions return and for chat
                prompts; None: the model's own. Text prompts of completions are tokenized with the model's own
                tokenizer. Default None.
            type_k: Type of the attention cache: GGML_TYPE_F16 (1; None means this) or GGML_TYPE_F32 (0);
                anything else is a ValueError. Default None.
            type_v: Not used: there is no separate value cache (keys and values share one latent, stored as
                type_k). Default None.
            spm_infill: With a `suffix` (fill in the middle), put the suffix tokens first
                (suffix, prefix, middle), as llama-cpp-python does for SPM-style infill. Default False.
            verbose: Print the loading summary and notes (ignored arguments) on stderr. Default True.
            device: The compute device: "auto" (the ggml build's first GPU, or integrated GPU, else the CPU),
                "cpu", or a device name from llama_dsv4._ggml.devices() (the CLI's --list-devices); an unknown
                name is a ValueError. The CPU also computes what the device cannot. Default "auto".
            moe_hot_count: MoE expert residency (docs/moe-residency.md): keep each layer's N most used
                experts locked in RAM and let the kernel page out the others, for a machine with less RAM than
                the model. N (an int, or a string such as "64"), "auto" (per layer, the fewest experts that hold
                99 % of its recent routing, at least the experts each token uses), or a per-layer list (ints,
                or "a,b,c"). None, 0 or "off": off. Needs use_mmap=True. A bad value is a ValueError before
                anything is loaded. Default None.
            moe_hot_budget_mib: With moe_hot_count, a cap in MiB on the locked expert bytes (any mode); the hot
                sets are trimmed to fit, keeping the experts that cover the most routed tokens per byte. Default
                None (no cap).
            moe_stats_path: With moe_hot_count, the file where the routing statistics persist across runs
                (merged into it periodically and at close, under a lock, so processes can share it). Default None:
                ~/.llama/expert_<general.name>.dsv4.bin.
            moe_release_cold: With moe_hot_count, hand the pages of cold experts back to the kernel at start and
                at each hot-set update, instead of leaving them for the kernel to evict first. Default False.
            moe_prefetch: Routing-aware prefetch (docs/moe-residency.md, "Prefetch"): as soon as a layer has chosen
                its experts, ask the kernel for their pages that are not in memory (madvise MADV_WILLNEED), so the
                disk reads run together and beside the shared expert's compute instead of one page fault at a time.
                True (or "on"), False (or "off"), or "auto": on where the model file is larger than 90 % of the
                memory this process may hold (the physical memory, or its cgroup's limit where lower), with
                use_mmap=True and the CPU device; off otherwise (with memory to spare, pages read by madvise cost
                about 5 % of decode speed against pages read by faults: docs/moe-residency.md). Results never
                change. True needs use_mmap=True and the CPU device. Default "auto".
            moe_device_experts: Hot experts on the device (docs/moe-residency.md): each MoE layer's N most used
                experts (the ranking of the routing statistics, persisted in moe_stats_path's file; experts 0 ...
                N-1 before there are any) copied into the device's memory and computed there, the others left in
                host memory (the mapped file) and computed by the CPU; every other weight goes to the device.
                For a GPU with less memory than the model. The set follows the statistics every 1,024 tokens,
                copying only the experts that changed. Results do not depend on which experts are hot. 0: off.
                With the CPU as the device it runs too (every expert computed twice: for tests only). Default 0.
            rpc_servers: "host:port,host:port": llama-dsv4-rpc-server processes that hold a share of the layers
                (tensor_split), as llama.cpp's --rpc. Needs the RPC-enabled install (README, "Beyond one
                machine"). The local part and the connections run in a child process, so a server that dies,
                answers garbage or stops answering is an RPCError (a ConnectionError) within rpc_timeout seconds,
                never a crash or a hang; the next call connects again and evaluates the sequence again (docs/rpc.md).
                Default None.
            rpc_timeout: Seconds one evaluation on the split may take before it counts as failed. Default 120.
            **kwargs: Other keywords: ignored (a note on stderr when verbose).

        Raises:
            ValueError: The path does not exist, the file is not a usable deepseek4 GGUF, a value is out of range
                (n_ctx < 0, n_batch or n_ubatch <= 0, n_seq_max outside 1 .. 256, batch_wait_ms outside 0 .. 60000,
                type_k, moe_hot_count, moe_hot_budget_mib, moe_device_experts), moe_hot_count or moe_prefetch
                with use_mmap=False, moe_device_experts with rpc_servers,
                moe_prefetch on a device other than the CPU, an unknown device, or a
                context that does not fit in memory.
            TypeError: n_ctx, n_batch, n_ubatch or n_seq_max is not an integer.
        """
        self.verbose = verbose
        self.model_path = os.fspath(model_path) if model_path is not None else model_path
        self._closed = True
        if self.model_path is None or not os.path.exists(self.model_path):
            raise ValueError(f"Model path does not exist: {model_path}")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch), ("n_seq_max", n_seq_max)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0 (0: the model's training context), got {n_ctx}")
        if n_batch <= 0 or n_ubatch <= 0:
            raise ValueError(f"n_batch and n_ubatch must be positive, got {n_batch} and {n_ubatch}")
        if not 1 <= n_seq_max <= 256:
            raise ValueError(f"n_seq_max must be between 1 and 256, got {n_seq_max}")
        if not 0 <= batch_wait_ms <= 60_000:  # (NaN too; an infinite wait would stall every sequence for a pause)
            raise ValueError(f"batch_wait_ms must be >= 0 and at most 60000 (a minute), got {batch_wait_ms}")
        self.n_seq_max = int(n_seq_max)
        cpus = usable_cpus()
        threads, threads_note = fit_count("n_threads", n_threads, max(cpus // 2, 1), cpus)  # llama-cpp-python's
        threads_batch, batch_note = fit_count("n_threads_batch", n_threads_batch, cpus, cpus)
        if type_k not in (None, *_CACHE_TYPE_NAMES):
            raise ValueError(f"type_k {type_k} is not supported; use GGML_TYPE_F16 (1) or GGML_TYPE_F32 (0)")
        hot_count = parse_hot_count(moe_hot_count)  # a ValueError before anything is loaded
        if isinstance(moe_device_experts, bool) or not isinstance(moe_device_experts, (int, np.integer)):
            raise TypeError(
                f"moe_device_experts must be an integer (experts per layer, 0: off), got {moe_device_experts!r}"
            )
        device_experts = int(moe_device_experts)
        if device_experts < 0:
            raise ValueError(f"moe_device_experts must be >= 0 (0: off), got {moe_device_experts}")
        moe_config = (
            MoEConfig(
                hot_count, budget_mib=moe_hot_budget_mib, stats_path=moe_stats_path, release_cold=bool(moe_release_cold)
            )
            if hot_count is not None
            else None
        )
        if moe_config is not None and not use_mmap:
            raise ValueError(
                "moe_hot_count locks and releases pages of the mapped model file: it needs use_mmap=True "
                "(with use_mmap=False every weight is already in memory)"
            )
        moe_prefetch = parse_prefetch(moe_prefetch)  # a ValueError before anything is loaded
        if moe_prefetch == "auto" and not use_mmap:
            moe_prefetch = False
        if moe_prefetch is True and not use_mmap:
            raise ValueError(
                "moe_prefetch asks the kernel to read pages of the mapped model file: it needs use_mmap=True "
                "(with use_mmap=False every weight is already in memory)"
            )
        if moe_config is None and (moe_hot_budget_mib is not None or moe_stats_path is not None) and verbose:
            print("llama-dsv4: moe_hot_budget_mib / moe_stats_path apply only with moe_hot_count", file=sys.stderr)
        if kwargs and verbose:
            print(f"llama-dsv4: ignoring unknown arguments {sorted(kwargs)}", file=sys.stderr)

        loading = runtime.cpu_look()  # the thread governor starts from the CPUs free while loading
        try:
            self._model = load_model(self.model_path, use_mmap=bool(use_mmap))
        except ValueError as e:
            raise ValueError(f"Failed to load model from file: {self.model_path}: {e}") from e
        self._closed = False
        params = self._model.params
        if rope_freq_base and rope_freq_base != params.rope_freq_base:
            warnings.warn(
                f"rope_freq_base={rope_freq_base} overrides the model's {params.rope_freq_base} (sliding-window "
                "layers only; compressed layers keep their own base)",
                RuntimeWarning,
                stacklevel=2,
            )
            params = params.with_(rope_freq_base=float(rope_freq_base))
        self._params = params
        self.metadata: dict[str, str] = _metadata_strings(self._model.metadata)
        self._vocab = self._model.vocab
        self._dsv4_tokenizer = DSV4Tokenizer(self._vocab) if self._vocab is not None else None
        self.tokenizer_ = tokenizer if tokenizer is not None else LlamaTokenizer(self, weak=True)  # no cycle

        self._n_vocab = params.n_vocab
        self._n_ctx = params.n_ctx_train if n_ctx == 0 else int(n_ctx)
        self.n_batch = min(self._n_ctx, int(n_batch))
        self.n_ubatch = min(self.n_batch, int(n_ubatch))
        for note in (threads_note, batch_note):
            if note is not None:
                warnings.warn(note, RuntimeWarning, stacklevel=2)
        self._logits_all = bool(logits_all) or draft_model is not None
        spec_n = self._spec(spec_type, spec_draft_n_max, draft_model, params)
        self._embedding = embedding
        self.cache: BaseLlamaCache | None = None
        self.lora_base, self.lora_scale, self.lora_path = lora_base, lora_scale, lora_path
        self.spm_infill = spm_infill
        self.tensor_split = tensor_split
        self.kv_overrides = kv_overrides
        self.numa = numa
        self.chat_format = chat_format
        self.chat_handler = chat_handler
        from .chat.formats import LlamaChatCompletionHandlerRegistry  # here: the chat package loads with a Llama

        # the model's own chat templates over the process-wide named formats (llama_dsv4.chat.formats)
        self.chat_formats = ChatFormatRegistry(parent=LlamaChatCompletionHandlerRegistry())
        self._is_recurrent = False
        self._is_hybrid = False
        type_k_name = _CACHE_TYPE_NAMES.get(type_k, "f16") if type_k is not None else "f16"
        self.model_params = _Params(
            n_gpu_layers=n_gpu_layers,
            split_mode=split_mode,
            main_gpu=main_gpu,
            vocab_only=vocab_only,
            use_mmap=use_mmap,
            use_mlock=use_mlock,
        )
        self.context_params = _Params(
            n_ctx=self._n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_ubatch,
            n_seq_max=self.n_seq_max,
            kv_unified=bool(kv_unified),
            n_threads=threads,
            n_threads_batch=threads_batch,
            flash_attn=flash_attn,
            type_k=type_k_name,
            embeddings=embedding,
            seed=seed or LLAMA_DEFAULT_SEED,
            rope_freq_base=rope_freq_base,
            rope_freq_scale=rope_freq_scale,
        )
        self._init_kwargs = dict(
            model_path=self.model_path,
            vocab_only=vocab_only,
            use_mmap=use_mmap,
            use_mlock=use_mlock,
            seed=seed,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_seq_max=n_seq_max,
            kv_unified=kv_unified,
            batch_wait_ms=batch_wait_ms,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            rope_freq_base=rope_freq_base,
            rope_freq_scale=rope_freq_scale,
            logits_all=logits_all,
            embedding=embedding,
            flash_attn=flash_attn,
            last_n_tokens_size=last_n_tokens_size,
            chat_format=chat_format,
            type_k=type_k,
            verbose=verbose,
            device=device,
            spec_type=spec_type,
            spec_draft_n_max=spec_draft_n_max,
            rpc_servers=rpc_servers,
            tensor_split=tensor_split,
            rpc_timeout=rpc_timeout,
        )

        keep_back = min(spec_n or 0, self.n_ubatch - 1)  # a rejected draft's compressor rows come back from a backup
        runner = None
        if not vocab_only:
            rows = self._n_ctx if self._logits_all else self.n_batch  # each sequence's input_ids and scores
            context = runtime.create_context(
                self._model,
                params=params,
                n_ctx=self._n_ctx,
                n_ubatch=self.n_ubatch,
                type_k=type_k_name,
                flash_attn=bool(flash_attn),
                device=device,
                n_threads=max(threads, threads_batch),
                host_bytes=self.n_seq_max * (4 * self._n_ctx + 4 * rows * self._n_vocab),
                n_seq=self.n_seq_max,
                mtp=spec_n is not None,
                keep_back=keep_back,
                hot_experts=device_experts,
                rpc_servers=runtime.parse_endpoints(rpc_servers) if rpc_servers else None,
                tensor_split=list(tensor_split) if tensor_split is not None else None,
                rpc_timeout=float(rpc_timeout),
            )
            runner = Runner(
                self._model,
                context,
                loading,
                moe=moe_config,
                use_mlock=bool(use_mlock),
                batch_wait_ms=float(batch_wait_ms),
                positions_limit=self._n_ctx if kv_unified and self.n_seq_max > 1 else None,
                spec_draft_n_max=spec_n,
                moe_prefetch=moe_prefetch,
            )
        self._runner = runner
        self._owner: Llama | None = None  # a slot's: the Llama that owns the context
        self._slots: dict[int, Llama] = {}  # the owner's: its open slots
        self._new_sequence = functools.partial(
            TokenSequence,
            runner,
            n_ctx=self._n_ctx,
            n_batch=self.n_batch,
            n_vocab=self._n_vocab,
            logits_all=self._logits_all,
            grammar_state=functools.partial(grammar_state, self._dsv4_tokenizer),  # (no reference to self)
            state_size=state_bytes(
                params, self._n_ctx, self.n_ubatch, type_k_name, mtp=spec_n is not None, keep_back=keep_back
            ),
        )
        self._seq = self._new_sequence(
            n_threads=threads,
            n_threads_batch=threads_batch,
            last_n_tokens_size=last_n_tokens_size,
            seed=seed or LLAMA_DEFAULT_SEED,
            draft_model=draft_model,
        )
        self._chat_init(chat_format, chat_handler)
        if self.n_batch < 32 and not vocab_only:
            warnings.warn(
                f"n_batch={self.n_batch} evaluates prompts {self.n_batch} tokens at a time, which is slow "
                "(LangChain's default is 8); n_batch=512 is llama-cpp-python's",
                RuntimeWarning,
                stacklevel=2,
            )
        if verbose:
            print(
                f"llama-dsv4: loaded {self.model_path} ({params.n_layer} layers, {self._n_vocab} tokens), "
                f"n_ctx={self._n_ctx}, n_batch={self.n_batch}, cache {type_k_name}"
                + (f", on {runtime.device_summary(self._runner.context.backends)}" if self._runner is not None else ""),
                file=sys.stderr,
            )

    # ---------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the context, the token buffers and the logits, and unmap the model file (even if saving the MoE
        statistics fails: that is a warning). A computation running in another thread finishes first; a stream left
        open fails with "closed" when it resumes. This closes the slots too; a slot's close() releases only its
        sequence (its tokens and buffers; the engine forgets it)."""
        if getattr(self, "_closed", True):
            return
        runner = getattr(self, "_runner", None)
        with runner.lock if runner is not None else contextlib.nullcontext():
            if self._closed:
                return
            self._closed = True
            seq = getattr(self, "_seq", None)
            if seq is not None:
                seq.close()
            owner = getattr(self, "_owner", None)
            if owner is not None:  # a slot: the owner keeps the context
                owner._slots.pop(seq.seq_id, None)
                if runner is not None and runner.context is not None:
                    runner.reset(seq.seq_id)
                return
            for slot in list(self._slots.values()):
                slot.close()
            try:
                if runner is not None:
                    runner.close()
            finally:
                self._model.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._init_kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Llama has been closed")

    # ---------------------------------------------------------------------------------------------- sequences
    def slot(self, i: int) -> Llama:
        """A Llama over sequence `i` of this Llama's context (0 .. n_seq_max - 1; 0 is this Llama itself): the same
        model, engine, tokenizer, chat formats and settings, its own tokens, seed, sampler and lock (no prompt
        cache: set_cache per slot). Completions on different slots run at once in different threads and are
        evaluated together (continuous batching). The same slot is returned until it is closed; its close()
        releases only its sequence, this Llama's closes every slot. ValueError for a sequence the context does not
        hold, or once closed."""
        if self._owner is not None:
            return self._owner.slot(i)
        self._check_open()
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n_seq_max:
            raise ValueError(f"slot {i!r} is not a sequence of this Llama (0 .. {self.n_seq_max - 1}, n_seq_max)")
        if i == 0:
            return self
        if self._runner is None:
            raise ValueError("this Llama was created with vocab_only=True: it has no sequences")
        i = int(i)
        with self._runner.lock:
            if i not in self._slots:
                facade = object.__new__(Llama)
                facade.__dict__.update(self.__dict__)
                first = self._seq
                facade._seq = self._new_sequence(
                    n_threads=first.n_threads,
                    n_threads_batch=first.n_threads_batch,
                    last_n_tokens_size=first.last_n_tokens_size,
                    seed=self.context_params.seed,
                    draft_model=first.draft_model,
                    seq_id=i,
                )
                facade._owner, facade._slots, facade.cache = self, {}, None
                self._slots[i] = facade
            return self._slots[i]

    def create_completions(self, prompts: Sequence[str | list[int]], **kwargs: Any) -> list[CreateCompletionResponse]:
        """One completion per prompt (create_completion's keywords, the same for all; no stream), returned in the
        order of `prompts`. With n_seq_max > 1 they run at once on this Llama's sequences (at most n_seq_max at a
        time, the others waiting for a free one) and are evaluated together, one graph per step for all of them;
        with n_seq_max = 1 one after another. The first failure (in the order of `prompts`) is raised once the
        completions running have finished; the ones not started yet are not run."""
        if kwargs.get("stream"):
            raise ValueError("create_completions returns whole responses: stream=True is not supported")
        self._check_open()
        prompts = list(prompts)
        if self.n_seq_max == 1 or len(prompts) <= 1:
            return [self.create_completion(p, **kwargs) for p in prompts]  # type: ignore[misc]
        return _completion.on_sequences(
            [self.slot(i) for i in range(min(self.n_seq_max, len(prompts)))], prompts, kwargs
        )

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def sequence(self) -> TokenSequence:
        """The sequence this Llama evaluates (llama_dsv4.sequence.Sequence): its tokens and logits, eval, sample,
        generate, save/load and its lock. Completions, chat and the server drive it through its public methods."""
        return self._seq

    n_tokens = _OfSequence("n_tokens")
    input_ids = _OfSequence("input_ids")
    scores = _OfSequence("scores")
    n_threads = _OfSequence("n_threads")
    n_threads_batch = _OfSequence("n_threads_batch")
    last_n_tokens_size = _OfSequence("last_n_tokens_size")
    draft_model = _OfSequence("draft_model")
    _seed = _OfSequence("seed")

    @property
    def _input_ids(self) -> npt.NDArray[np.intc]:
        return self._seq.tokens

    @property
    def _scores(self) -> npt.NDArray[np.single]:
        return self.scores[: self.n_tokens, :] if self._logits_all else self.scores[:0]

    @property
    def eval_tokens(self) -> deque[int]:
        """The evaluated token ids (input_ids[:n_tokens]) as a deque, as llama-cpp-python exposes them."""
        return deque(self._seq.tokens.tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> deque[list[float]]:
        """The evaluated positions' logits as a deque of lists: every position with logits_all=True, else
        none."""
        rows = self.scores[: self.n_tokens] if self._logits_all else np.zeros((0, self._n_vocab))
        return deque(rows.tolist(), maxlen=self._n_ctx if self._logits_all else 1)

    @property
    def ctx(self) -> int | None:
        """This Llama's context as a low-level `llama_context_p` handle (llama_dsv4.compat.lowlevel: llama_decode,
        llama_get_logits, llama_get_memory, ...); None with vocab_only."""
        from .compat.handles import handle_of

        return handle_of(self, "context") if self._ctx is not None and not self._closed else None

    @property
    def model(self) -> int | None:
        """This Llama's model as a low-level `llama_model_p` handle (llama_model_get_vocab, llama_model_n_embd,
        ...); None once closed."""
        from .compat.handles import handle_of

        return handle_of(self, "model") if not self._closed else None

    @property
    def _n_threads(self) -> int:
        return self.n_threads

    def n_ctx(self) -> int:
        """The context size in positions (n_ctx as resolved at load: 0 became the model's training context)."""
        return self._n_ctx

    def n_embd(self) -> int:
        """The model's embedding width (hidden size)."""
        return self._params.n_embd

    def n_vocab(self) -> int:
        """The vocabulary size (token ids are 0 .. n_vocab - 1)."""
        return self._n_vocab

    def pooling_type(self) -> str:
        """-1 (llama.cpp's LLAMA_POOLING_TYPE_UNSPECIFIED): the model has no embedding output to pool."""
        return -1  # type: ignore[return-value]

    def token_bos(self) -> int:
        """The beginning-of-sequence token id, or -1 when the vocabulary has none."""
        v = self._vocab
        return v.bos_id if v is not None and v.bos_id is not None else -1

    def token_eos(self) -> int:
        """The end-of-sequence token id, or -1 when the vocabulary has none."""
        v = self._vocab
        return v.eos_id if v is not None and v.eos_id is not None else -1

    def token_nl(self) -> int:
        """The token id of a newline, or -1 without a vocabulary."""
        if self._dsv4_tokenizer is None:
            return -1
        ids = self._dsv4_tokenizer.tokenize(b"\n", add_bos=False)
        return ids[0] if ids else -1

    def tokenizer(self) -> LlamaTokenizer:
        """A LlamaTokenizer over the model's own vocabulary (llama-cpp-python's interface: tokenize, detokenize,
        encode, decode)."""
        return LlamaTokenizer(self)

    # ---------------------------------------------------------------------------------------------- text
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` (bytes). As llama.cpp, `add_bos` adds a BOS only if the vocabulary asks for one."""
        self._check_open()
        return self.tokenizer_.tokenize(text, add_bos, special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes of `tokens`; control tokens only with `special`."""
        self._check_open()
        return self.tokenizer_.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def spec_stats(self) -> dict[str, Any] | None:
        """Speculative decoding with the MTP block so far (None when spec_type is off): draft steps, drafted and
        accepted tokens, and the accepted drafts by their position in a draft (docs/speculative.md)."""
        runner = self._runner
        mtp = runner.mtp if runner is not None else None
        return mtp.stats() if mtp is not None else None

    def batch_stats(self) -> dict[str, float] | None:
        """Continuous batching of this Llama's context so far (None with n_seq_max 1), shared by all its slots:
        steps computed, the sequences and tokens they held, seconds computing and gathering, sequences per step
        and ubatch occupancy (docs/batching.md)."""
        runner = self._runner
        batcher = runner.batcher if runner is not None else None
        return batcher.stats() if batcher is not None else None

    def moe_stats(self) -> dict[str, Any] | None:
        """MoE expert residency figures (None when moe_hot_count and moe_prefetch are off): locked and resident
        bytes as the kernel reports them, online hit rate, per-layer hot counts, updates and their time; with
        moe_prefetch its counters `prefetch_calls`, `prefetch_slices`, `prefetch_missing_slices`,
        `prefetch_missing_bytes`; with moe_device_experts `device`, `device_hot_experts`, `device_hot_bytes`,
        `device_slot_copies`, `device_updates` (docs/moe-residency.md)."""
        moe = self._moe
        runner = self._runner
        prefetch = runner.prefetch_stats() if runner is not None else None
        if moe is None and prefetch is None:
            return None
        out: dict[str, Any] = {}
        if moe is not None:
            self._commit_routes()
            out.update(moe.stats())
        device_hot = runner.device_hot if runner is not None else None
        if device_hot is not None:
            out.update(device_hot.stats())
        out.update({f"prefetch_{k}": v for k, v in (prefetch or {}).items()})
        return out

    def moe_save_stats(self) -> bool:
        """Merge the routing statistics into their file now (also done periodically and at close)."""
        moe = self._moe
        if moe is None:
            return False
        self._commit_routes()
        return moe.save()

    def _commit_routes(self) -> None:
        runner = self._runner
        if runner is not None:
            with runner.lock:
                runner.commit_routes()

    @property
    def _moe(self) -> Any:
        runner = getattr(self, "_runner", None)
        return runner.moe if runner is not None else None

    @property
    def _ctx(self) -> Any:
        """The engine context (engine/context.pyx), None with vocab_only or once closed."""
        runner = getattr(self, "_runner", None)
        return runner.context if runner is not None else None

    @property
    def dsv4_tokenizer(self) -> DSV4Tokenizer:
        """The model's own tokenizer (llama_dsv4.tokenizer.DSV4Tokenizer: bounded tokenization, token pieces, the
        vocabulary). ValueError when the model file has no vocabulary, or once closed."""
        self._check_open()
        if self._dsv4_tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer (tokenizer.ggml.model = no_vocab); pass token ids")
        return self._dsv4_tokenizer

    # ---------------------------------------------------------------------------------------------- evaluation
    def set_cache(self, cache: BaseLlamaCache | None) -> None:
        """Use `cache` (a LlamaRAMCache, LlamaDiskCache, ...) as the prompt cache of completions: a prompt sharing a
        longer prefix with a cached state than with what is evaluated restarts from that state. None: no cache."""
        self.cache = cache

    def set_seed(self, seed: int) -> None:
        """Set the sampling seed: sample() and generate() draw with it, and the next completion without a seed of its
        own derives its seed from it."""
        self._seq.seed = seed

    def reset(self) -> None:
        """Forget the evaluated sequence (the next eval starts at position 0)."""
        self._seq.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after the first n_tokens (anything evaluated beyond n_tokens is discarded first)."""
        self._check_open()
        self._seq.eval(tokens)

    def sample(
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_eta: float = 0.1,
        mirostat_tau: float = 5.0,
        penalize_nl: bool = True,
        logits_processor: LogitsProcessorList | None = None,
        grammar: LlamaGrammar | None = None,
        idx: int | None = None,
    ) -> int:
        """Sample a token from the logits of position `idx` (default: the last evaluated)."""
        self._check_open()
        return self._seq.sample(**_arguments(locals()))

    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        penalize_nl: bool = True,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        grammar: LlamaGrammar | None = None,
    ) -> Generator[int, Sequence[int] | None, None]:
        """Yield sampled tokens forever (the caller stops). A prompt that extends what was evaluated reuses it;
        a sampled token is evaluated when the generator is resumed; `.send(tokens)` appends more tokens. Other
        threads wait until the generator is finished or closed."""
        return self._seq.generate(**_arguments(locals()))

    # ---------------------------------------------------------------------------------------------- state
    def save_state(self) -> LlamaState:
        """A snapshot of the evaluation state: every field is read while the engine is held, so a state saved while
        another thread evaluates is one moment of the sequence."""
        self._check_open()
        return self._seq.save_state()

    def load_state(self, state: LlamaState) -> None:
        """Restore a state from save_state(). It is checked whole first: a state of another Llama (model, n_ctx,
        n_ubatch, cache type, logits_all) or a damaged one is a ValueError naming the mismatch, and changes nothing."""
        self._check_open()
        self._seq.load_state(state)

    def _context(self) -> Any:
        self._check_open()
        if self._ctx is None:
            raise ValueError("this Llama was created with vocab_only=True: it cannot evaluate tokens")
        return self._ctx

    # ---------------------------------------------------------------------------------------------- completion
    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = [],  # noqa: B006 - llama-cpp-python's default, never mutated
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        logits_processor: LogitsProcessorList | None = None,
        grammar: LlamaGrammar | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> CreateCompletionResponse | Iterator[CreateCompletionStreamResponse]:
        """Complete `prompt` (text, or token ids used as given). Returns the response, or an iterator of chunks
        with `stream=True`."""
        chunks = _completion.create_completion(self, **_arguments(locals()))
        if stream:
            return chunks
        try:
            return next(chunks)
        finally:
            chunks.close()

    __call__ = create_completion

    # ---------------------------------------------------------------------------------------------- chat
    def _spec(self, spec_type: str | None, n_max: Any, draft_model: Any, params: Any) -> int | None:
        """The MTP drafts per step that spec_type asks for (None: no MTP speculation), or ValueError."""
        if spec_type in (None, "none"):
            return None
        if spec_type not in ("mtp", "draft-mtp"):
            raise ValueError(f"spec_type must be 'mtp' (or 'draft-mtp'), 'none' or None, got {spec_type!r}")
        if draft_model is not None:
            raise ValueError("give either draft_model or spec_type='mtp', not both")
        if self.n_seq_max != 1:
            raise ValueError("spec_type='mtp' needs n_seq_max=1 (one sequence per context)")
        if params.n_nextn < 1:
            raise ValueError(
                f"spec_type='mtp' needs the model's MTP (nextn) layer, and {os.path.basename(self.model_path)} has "
                "none (no blk.N.nextn.* tensors)"
            )
        return check_draft_n_max(n_max)

    def _chat_init(self, chat_format: str | None, chat_handler: Any) -> None:
        from .chat import handlers

        handlers.install(self, chat_format, chat_handler)

    def create_chat_completion(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Chat with the model (OpenAI message format); see llama_dsv4.chat."""
        from .chat import handlers

        return handlers.create_chat_completion(self, messages, **kwargs)

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        """create_chat_completion returning the OpenAI SDK's ChatCompletion (or ChatCompletionChunk iterator)."""
        from .chat import handlers

        return handlers.create_chat_completion_openai_v1(self, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------- embeddings
    def create_embedding(self, input: str | list[str], model: str | None = None) -> CreateEmbeddingResponse:
        """Not available: DeepSeek V4 has no embedding output. RuntimeError without embedding=True,
        NotImplementedError with it."""
        self.embed(input)
        raise AssertionError  # embed raises

    def embed(
        self, input: str | list[str], normalize: bool = False, truncate: bool = True, return_count: bool = False
    ) -> Any:
        """Not available: DeepSeek V4 has no embedding output. RuntimeError without embedding=True,
        NotImplementedError with it."""
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        raise NotImplementedError("embeddings are not implemented for deepseek4 models")

    # ---------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def logits_to_logprobs(logits: npt.NDArray[np.single] | list, axis: int = -1) -> npt.NDArray[np.single]:
        """Log-softmax of `logits` along `axis` (float32), as llama-cpp-python's helper."""
        return log_softmax(logits, axis)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        """The length of the common prefix of two token sequences."""
        return longest_token_prefix(a, b)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str | None,
        additional_files: list[str] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        local_dir_use_symlinks: bool | str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> Llama:
        """Download a GGUF (and the other shards of a split set) from the Hugging Face Hub and load it."""
        from .hub import download

        path = download(
            repo_id,
            filename,
            additional_files=additional_files,
            local_dir=local_dir,
            cache_dir=cache_dir,
            revision=revision,
            token=token,
        )
        return cls(model_path=path, **kwargs)


def _metadata_strings(kv: dict[str, Any]) -> dict[str, str]:
    """GGUF metadata as llama.cpp reports it: strings, booleans as true/false, floats with six decimals, no arrays."""
    out = {}
    for k, v in kv.items():
        if isinstance(v, (list, tuple, np.ndarray)):
            continue
        if isinstance(v, (bool, np.bool_)):
            out[k] = "true" if v else "false"
        elif isinstance(v, (float, np.floating)):
            out[k] = f"{float(v):f}"
        else:
            out[k] = str(v)
    return out
