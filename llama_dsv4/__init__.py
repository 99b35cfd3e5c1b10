"""llama_dsv4: local inference of DeepSeek V4 GGUF files (arch `deepseek4`) on ggml, with llama-cpp-python's API."""

__version__ = "0.1.0"

from . import _extensions  # noqa: F401  first: a clear error where the compiled extensions are not built
from .cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache
from .engine.isolated import RPCError
from .grammar import LlamaGrammar
from .llama import LLAMA_DEFAULT_SEED, Llama, LlamaState
from .sampling import (
    LogitsProcessor,
    LogitsProcessorList,
    MinTokensLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from .tokenizer import BaseLlamaTokenizer, LlamaHFTokenizer, LlamaTokenizer

__all__ = [
    "LLAMA_DEFAULT_SEED",
    "BaseLlamaCache",
    "BaseLlamaTokenizer",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaGrammar",
    "LlamaHFTokenizer",
    "LlamaRAMCache",
    "LlamaState",
    "LlamaTokenizer",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinTokensLogitsProcessor",
    "RPCError",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "__version__",
]
