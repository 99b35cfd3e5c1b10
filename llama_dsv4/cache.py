"""Prompt caches (llama-cpp-python's `llama_cpp.llama_cache`): states keyed by token sequences, looked up by the
longest common prefix."""

from __future__ import annotations

import hashlib
import os
import pickle
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import LlamaState


def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BaseLlamaCache(ABC):
    """llama-cpp-python's prompt-cache interface: LlamaState values keyed by token sequences, looked up by the
    longest common prefix; capacity_bytes bounds the total size."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def cache_size(self) -> int: ...

    def _find_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_len = None, 0
        for k in self._keys():
            n = longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    @abstractmethod
    def _keys(self) -> list[tuple[int, ...]]: ...

    @abstractmethod
    def __getitem__(self, key: Sequence[int]) -> LlamaState: ...

    @abstractmethod
    def __contains__(self, key: Sequence[int]) -> bool: ...

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None: ...


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, least recently used evicted beyond `capacity_bytes`."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        super().__init__(capacity_bytes)
        self.cache_state: OrderedDict[tuple[int, ...], LlamaState] = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(state.llama_state_size for state in self.cache_state.values())

    def _keys(self) -> list[tuple[int, ...]]:
        return list(self.cache_state)

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        k = self._find_prefix_key(tuple(key))
        if k is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(k)
        return self.cache_state[k]

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        k = tuple(key)
        self.cache_state.pop(k, None)
        self.cache_state[k] = value
        while self.cache_size > self.capacity_bytes and len(self.cache_state) > 0:
            self.cache_state.popitem(last=False)


LlamaCache = LlamaRAMCache


class LlamaDiskCache(BaseLlamaCache):
    """States pickled into a directory, least recently used evicted beyond `capacity_bytes`. As llama-cpp-python's,
    reading an entry removes it (the caller saves the state again after the completion)."""

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = 2 << 30) -> None:
        super().__init__(capacity_bytes)
        self.cache_dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)
        self._index_path = os.path.join(cache_dir, "index.pkl")
        self._index: OrderedDict[tuple[int, ...], tuple[str, int]] = OrderedDict()
        if os.path.exists(self._index_path):
            try:
                with open(self._index_path, "rb") as f:
                    index = pickle.load(f)
                if isinstance(index, OrderedDict):
                    self._index = index
            except Exception:  # a corrupt index: start empty
                self._index = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(size for _, size in self._index.values())

    def _keys(self) -> list[tuple[int, ...]]:
        return list(self._index)

    def _save_index(self) -> None:
        tmp = self._index_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self._index, f)
        os.replace(tmp, self._index_path)

    def __getitem__(self, key: Sequence[int]) -> LlamaState:
        k = self._find_prefix_key(tuple(key))
        if k is None:
            raise KeyError("Key not found")
        fname, _ = self._index.pop(k)
        path = os.path.join(self.cache_dir, fname)
        try:
            with open(path, "rb") as f:
                value = pickle.load(f)
        finally:
            if os.path.exists(path):
                os.remove(path)
            self._save_index()
        return value

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_prefix_key(tuple(key)) is not None

    def __setitem__(self, key: Sequence[int], value: LlamaState) -> None:
        k = tuple(key)
        fname = hashlib.sha256(repr(k).encode()).hexdigest() + ".pkl"
        with open(os.path.join(self.cache_dir, fname), "wb") as f:
            pickle.dump(value, f)
        self._index.pop(k, None)
        self._index[k] = (fname, value.llama_state_size)
        while self.cache_size > self.capacity_bytes and self._index:
            old, _ = self._index.popitem(last=False)[1]
            p = os.path.join(self.cache_dir, old)
            if os.path.exists(p):
                os.remove(p)
        self._save_index()
