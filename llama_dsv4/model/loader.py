"""Open a deepseek4 GGUF (one file or a split set), validate all of it, and map its tensors into ggml.

Data flow: files -> mmap -> headers (gguf_read) -> DSV4Params + Vocab + tensor table, each checked against the
others -> WeightMap (ggml tensors pointing into the mappings, no copy; or, with use_mmap=False, read into memory
the process owns). Everything is validated before ggml sees a byte; a problem raises ValueError naming the file
and the key or tensor. What the graph uses as indices (tid2eid) is validated once and used from that private
copy, never read again from the file.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _ggml
from .gguf_format import GGMLType, ValueType
from .gguf_read import GGUFError, GGUFHeader, TensorInfo, read_header
from .params import DSV4Params, params_from_kv
from .tensors import Role, TensorSpec, model_tensors, optional_nextn_tensors
from .vocab import Vocab, vocab_from_kv

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# ggml types that cannot hold weights (integers, doubles, and the activation-only Q8_1 / Q8_K)
_NOT_WEIGHT_TYPES = frozenset({9, 15, 24, 25, 26, 27, 28})


def split_paths(path: str) -> list[str]:
    """All shard paths of the split set `path` belongs to, or [path] if it is not a shard name."""
    m = _SPLIT_RE.match(path)
    if not m:
        return [path]
    count = int(m["count"])
    if count < 1 or not 1 <= int(m["no"]) <= count:
        raise ValueError(f"{path}: shard number {int(m['no'])} of {count} is impossible")
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _open(path: str) -> int:
    """An open descriptor of the model file `path` (ValueError if it is missing, not a file, or empty)."""
    if not os.path.exists(path):
        raise ValueError(f"model file does not exist: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"model path is not a regular file: {path}")
    fd = os.open(path, os.O_RDONLY)
    if os.fstat(fd).st_size == 0:
        os.close(fd)
        raise GGUFError(f"{path}: the file is empty")
    return fd


def _pread(fd: int, n: int, offset: int, what: str) -> np.ndarray:
    """n bytes of a file from offset (ValueError if it ends first: it changed after it was validated)."""
    out = np.empty(n, np.uint8)
    view = memoryview(out)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{what}: the file ended before its data (it changed after it was loaded)")
        done += got
    return out


def _weight_type_ok(spec: TensorSpec, type_id: int) -> bool:
    if spec.role == Role.TID2EID:
        return type_id == GGMLType.I32
    if spec.role == Role.NORM or len(spec.ne) == 1:
        return type_id == GGMLType.F32
    return type_id not in _NOT_WEIGHT_TYPES


def _type_name(type_id: int) -> str:
    tr = _ggml.type_traits(type_id)
    return tr[0] if tr else str(type_id)


@dataclass
class ModelFile:
    """A validated deepseek4 model: parameters, vocabulary, chat template, and its tensors in the files.

    With use_mmap the files stay mapped and weights() points into the mappings; without it only their descriptors
    stay open and weights() reads every tensor into memory. `_private` holds the validated copies of the tensors
    the graph uses as indices (tid2eid), which weights() uses instead of the file's bytes.
    """

    paths: list[str]
    params: DSV4Params
    vocab: Vocab | None
    chat_template: str | None
    metadata: dict[str, Any]  # the first shard's key/value pairs
    tensors: dict[str, TensorInfo]
    _maps: list[mmap.mmap] = field(repr=False)
    _files: list[int] | None = field(default=None, repr=False)  # use_mmap=False: one descriptor per shard
    _private: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _weights: Any = field(default=None, repr=False)
    _placement: list[int] | None = field(default=None, repr=False)

    @property
    def use_mmap(self) -> bool:
        """Whether the weights are (or will be) pages of the mapped files rather than memory the process owns."""
        return self._files is None

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def n_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def expert_bytes(self) -> int:
        """The bytes of the routed experts' tensors (ffn_{gate,up,down}_exps of every layer)."""
        return sum(t.nbytes for name, t in self.tensors.items() if _EXPERTS.fullmatch(name))

    def weights(
        self, backends: Any = None, layer_devices: list[int] | None = None, experts_on_cpu: bool = False
    ) -> _ggml.WeightMap:
        """The tensors as ggml tensors, created once: zero-copy views of the mappings on the CPU (use_mmap), else
        read into memory allocated on the backends' device. layer_devices: the backend index of each layer's
        tensors (blk.N.*; the rest, and layers past the list, stay on the local device), for a model split across
        devices. experts_on_cpu: the routed experts' tensors (ffn_{gate,up,down}_exps) on the CPU backend (the
        last), read in place from the mapping, whatever device the rest is on (hot experts on a device)."""
        if self._maps is None:
            raise ValueError(f"{self.path}: the model file has been closed")
        placement = None
        if layer_devices is not None or experts_on_cpu:
            home = backends.n_remote
            cpu = len(backends.names) - 1
            on_cpu = [experts_on_cpu and _EXPERTS.fullmatch(name) is not None for name in self.tensors]
            placement = [
                cpu if cpu_side else _layer_device(name, layer_devices or [], home)
                for name, cpu_side in zip(self.tensors, on_cpu, strict=True)
            ]
        if self._weights is not None and placement != self._placement:
            raise ValueError(f"{self.path}: its weights are already placed on other devices (one context per model)")
        if self._weights is None:
            table = [(t.name, t.type, t.ne, t.shard, t.offset, t.nbytes) for t in self.tensors.values()]
            source = {"maps": self._maps} if self._files is None else {"files": self._files}
            try:
                self._weights = _ggml.WeightMap(table, backends, private=self._private, placement=placement, **source)
            except ValueError as e:  # use_mmap=False: a file that changed since it was validated
                raise ValueError(f"{self.path}: {e}") from None
            self._placement = placement
        return self._weights

    def array(self, name: str) -> np.ndarray:
        """A copy of a tensor's stored values, read from the file (numpy order; dequantized to float32)."""
        if self._maps is None:
            raise ValueError(f"{self.path}: the model file has been closed")
        t = self.tensors[name]
        if self._files is None:
            raw = np.frombuffer(self._maps[t.shard], np.uint8, t.nbytes, t.offset)
        else:
            raw = _pread(self._files[t.shard], t.nbytes, t.offset, f"{self.paths[t.shard]}: tensor {name!r}")
        shape = t.ne[::-1]
        if t.type == GGMLType.I32:
            return raw.view(np.int32).reshape(shape).copy()
        return _ggml.dequantize(raw, t.type, t.n_elements).reshape(shape)

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
            self._weights = None
        for m in self._maps or []:
            m.close()
        for fd in self._files or []:
            os.close(fd)
        self._maps = None  # type: ignore[assignment]
        self._files = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_split_keys(h: GGUFHeader, index: int, count: int) -> None:
    kv, types = h.kv, h.kv_types

    def get(key: str) -> int | None:
        if key not in kv:
            return None
        if types[key].type not in (ValueType.UINT16, ValueType.INT32, ValueType.UINT32):
            raise GGUFError(f"{h.path}: key {key!r} has type {types[key]}, expected an integer")
        return int(kv[key])

    no, cnt = get("split.no"), get("split.count")
    if count == 1:
        if cnt not in (None, 0, 1):
            raise GGUFError(f"{h.path}: this file is shard {no} of a {cnt}-file split set; open it by its shard name")
        return
    if cnt != count or no != index:
        raise GGUFError(
            f"{h.path}: split keys say shard {no} of {cnt}, but the file name says shard {index} of {count}"
        )


def load_model(path: str | os.PathLike[str], *, use_mmap: bool = True) -> ModelFile:
    """Open and validate a deepseek4 GGUF: a single file, or any shard of a split set (all shards are opened).

    use_mmap=True (the default, as llama.cpp's): the files stay memory-mapped and the weights are their pages, read
    on first use and shared with the page cache. The files must then not be modified or truncated while the model
    is open: as in llama.cpp, a truncation makes the next read of a lost page a SIGBUS, and an overwrite changes
    the weights under the running model. use_mmap=False: the files are mapped only while their headers are read;
    weights() reads every tensor into memory the process owns (RAM for the whole model), after which the files may
    change or disappear. Either way, the tensors used as indices (tid2eid) are private copies of what was
    validated.
    """
    path = os.fspath(path)
    paths = split_paths(path)
    maps: list[mmap.mmap] = []
    fds: list[int] = []
    try:
        headers = []
        for i, p in enumerate(paths):
            if len(paths) > 1 and not os.path.exists(p):
                raise ValueError(f"{path}: split set incomplete, shard {p} is missing")
            fds.append(_open(p))
            maps.append(mmap.mmap(fds[-1], 0, access=mmap.ACCESS_READ))
            headers.append(read_header(maps[-1], p))
            _check_split_keys(headers[-1], i, len(paths))
        model = _validate(paths, headers, maps)
    except BaseException:
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
        raise
    if use_mmap:
        for fd in fds:
            os.close(fd)
    else:  # the descriptors replace the mappings: nothing maps the files any more
        for m in maps:
            m.close()
        model._maps, model._files = [], fds
    return model


def _validate(paths: list[str], headers: list[GGUFHeader], maps: list[mmap.mmap]) -> ModelFile:
    first = headers[0]
    where = first.path
    if len(headers) > 1:
        n = sum(len(h.tensors) for h in headers)
        for h in headers:  # every shard states the set's tensor count: all must agree with what the shards hold
            if "split.tensors.count" not in h.kv:
                continue
            if h.kv_types["split.tensors.count"].type not in (ValueType.UINT16, ValueType.INT32, ValueType.UINT32):
                raise GGUFError(
                    f"{h.path}: key 'split.tensors.count' has type {h.kv_types['split.tensors.count']}, "
                    "expected an integer"
                )
            total = int(h.kv["split.tensors.count"])
            if total != n:
                raise GGUFError(f"{h.path}: split.tensors.count says {total} tensors, the shards hold {n}")
    tensors: dict[str, TensorInfo] = {}
    for i, h in enumerate(headers):
        for t in h.tensors:
            if t.name in tensors:
                raise GGUFError(f"{h.path}: tensor {t.name!r} also appears in {paths[tensors[t.name].shard]}")
            tensors[t.name] = TensorInfo(t.name, t.ne, t.type, t.offset, t.nbytes, i)

    vocab = vocab_from_kv(first.kv, first.kv_types, where)
    params = params_from_kv(
        first.kv,
        first.kv_types,
        where,
        n_vocab=vocab.n_tokens if vocab is not None else None,
        has_nextn_tensors=lambda il: f"blk.{il}.nextn.eh_proj.weight" in tensors,
    )
    template = first.kv.get("tokenizer.chat_template")
    if template is not None and first.kv_types["tokenizer.chat_template"].type != ValueType.STRING:
        raise GGUFError(f"{where}: key 'tokenizer.chat_template' must be a string")

    expected = {s.name: s for s in model_tensors(params)}
    for il in range(params.n_layer, params.block_count):
        for s in optional_nextn_tensors(params, il):
            if s.name in tensors:
                expected[s.name] = s
    for name, spec in expected.items():
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{where}: tensor {name!r} is missing")
        if t.ne != spec.ne and t.ne != spec.alt_ne:
            raise GGUFError(
                f"{paths[t.shard]}: tensor {name!r} has shape {list(t.ne)}, the parameters need {list(spec.ne)}"
                + (f" (or {list(spec.alt_ne)})" if spec.alt_ne else "")
            )
        if not _weight_type_ok(spec, t.type):
            raise GGUFError(f"{paths[t.shard]}: tensor {name!r} has type {_type_name(t.type)}, not valid for it")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise GGUFError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} not part of a deepseek4 model)")

    model = ModelFile(paths, params, vocab, template, dict(first.kv), tensors, maps)
    for il in range(min(params.hash_layer_count, params.n_layer)):
        name = f"blk.{il}.ffn_gate_tid2eid.weight"
        ids = model.array(name)  # a copy: what is checked here is what the graph will index with
        bad = ids[(ids < 0) | (ids >= params.n_expert)]
        if bad.size:
            raise GGUFError(
                f"{paths[tensors[name].shard]}: tensor {name!r} holds expert id {int(bad[0])}"
                f" outside [0, {params.n_expert})"
            )
        model._private[name] = ids
    return model


_EXPERTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")  # the routed experts' tensors


def _layer_device(name: str, layer_devices: list[int], home: int) -> int:
    """The backend of a tensor: its layer's (blk.N.*) where layer_devices has one, else the local device."""
    if name.startswith("blk."):
        head = name.split(".", 2)[1]
        if head.isdigit() and int(head) < len(layer_devices):
            return layer_devices[int(head)]
    return home
