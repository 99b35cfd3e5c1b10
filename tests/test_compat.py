"""The opt-in `llama_cpp` alias, and LangChain's llama.cpp integrations running on it unchanged against a tiny model
(LlamaIndex's, Haystack's, instructor and the other libraries: tests/test_libraries.py)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import llama_dsv4
from llama_dsv4 import compat


@pytest.fixture
def alias() -> object:
    mod = compat.install()
    yield mod
    compat.uninstall()


def test_alias_resolves_to_llama_dsv4(alias: object) -> None:
    import llama_cpp
    from llama_cpp import Llama, LlamaGrammar, LlamaRAMCache, LogitsProcessorList
    from llama_cpp.llama import LlamaState
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerNotFoundException
    from llama_cpp.llama_types import ChatCompletionRequestUserMessage, CreateCompletionResponse

    assert Llama is llama_dsv4.Llama and LlamaGrammar is llama_dsv4.LlamaGrammar
    assert LlamaRAMCache is llama_dsv4.LlamaRAMCache and LogitsProcessorList is llama_dsv4.LogitsProcessorList
    assert LlamaState is llama_dsv4.LlamaState and issubclass(LlamaChatCompletionHandlerNotFoundException, Exception)
    assert ChatCompletionRequestUserMessage and CreateCompletionResponse
    assert llama_cpp.__version__ and llama_cpp.LLAMA_DEFAULT_SEED == 0xFFFFFFFF and llama_cpp.GGML_TYPE_F16 == 1
    assert llama_cpp.llama_supports_mmap() and isinstance(llama_cpp.llama_supports_gpu_offload(), bool)
    for sub in (
        "llama_cpp.llama_speculative",
        "llama_cpp.llama_tokenizer",
        "llama_cpp.llama_cache",
        "llama_cpp.llama_grammar",
        "llama_cpp._internals",
    ):
        assert importlib.import_module(sub)
    import numpy as np
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    f = LlamaPromptLookupDecoding.find_candidate_pred_tokens
    assert np.array_equal(f(np.array([1, 2, 3, 1, 2, 3, 1, 2, 3]), max_ngram_size=3, num_pred_tokens=2), [1, 2])
    assert np.array_equal(f(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), max_ngram_size=3, num_pred_tokens=2), [])


def test_uninstall_removes_the_alias(alias: object) -> None:
    compat.uninstall()
    assert "llama_cpp" not in sys.modules or not getattr(sys.modules["llama_cpp"], "__llama_dsv4__", False)


def test_langchain_llamacpp(alias: object, real_vocab_path: str) -> None:
    pytest.importorskip("langchain_community")
    from langchain_community.llms import LlamaCpp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our warning about n_batch=8, LangChain's default
        llm = LlamaCpp(model_path=real_vocab_path, temperature=0.0, max_tokens=6, verbose=False)
    assert llm.client.n_ctx() == 512  # LangChain's default n_ctx, honoured
    text = llm.invoke("Hello")
    assert isinstance(text, str) and len(llm.client.tokenize(text.encode())) <= 6
    assert "".join(llm.stream("Hello")) == text
    assert llm.batch(["Hello", "Hello"]) == [text, text]
    assert llm.get_num_tokens("Hello world") == 2


def test_langchain_chatllamacpp(alias: object, real_vocab_path: str) -> None:
    pytest.importorskip("langchain_community")
    from langchain_community.chat_models import ChatLlamaCpp
    from langchain_core.messages import HumanMessage, SystemMessage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chat = ChatLlamaCpp(model_path=real_vocab_path, temperature=0.0, max_tokens=6, n_ctx=512, verbose=False)
    msgs = [SystemMessage("Be brief."), HumanMessage("Hi")]
    reply = chat.invoke(msgs)
    assert isinstance(reply.content, str)
    streamed = "".join(c.content for c in chat.stream(msgs))
    assert streamed == reply.content
    assert [r.content for r in chat.batch([msgs, msgs])] == [reply.content, reply.content]


def test_image_chat_handlers_import_and_say_why_they_cannot_apply(alias: object) -> None:
    from llama_cpp import llama_chat_format
    from llama_cpp.llama_chat_format import Llava15ChatHandler  # Haystack's chat generator imports it

    assert llama_chat_format.Llava15ChatHandler is Llava15ChatHandler
    with pytest.raises(llama_chat_format.ChatFormatUnavailable, match="no vision input"):
        Llava15ChatHandler(clip_model_path="mmproj.gguf")
