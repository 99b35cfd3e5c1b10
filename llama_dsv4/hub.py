"""`Llama.from_pretrained`: find a GGUF in a Hugging Face Hub repository and download it with its shards.

Matching follows llama-cpp-python (fnmatch over the repository's file paths; 0 or several matches are a
ValueError listing the files), with three fixes: `filename` empty or None picks the repository's model when it
holds exactly one (one file or one split set) and otherwise lists the candidates; a shard of a split set brings
the whole set; `revision` and `token` are honoured.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from typing import Any

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _hub() -> Any:
    try:
        import huggingface_hub
        from huggingface_hub.utils import validate_repo_id
    except ImportError as e:
        raise ImportError("Llama.from_pretrained needs huggingface_hub: pip install huggingface-hub") from e
    huggingface_hub.validate_repo_id = validate_repo_id
    return huggingface_hub


def _models(files: list[str]) -> list[str]:
    """One entry per model among `files`: single .gguf files, and the first shard of each split set."""
    out = []
    for f in sorted(files):
        if not f.endswith(".gguf"):
            continue
        m = _SHARD.match(f)
        if m is None or int(m["no"]) == 1:
            out.append(f)
    return out


def _shards(path: str, files: list[str], repo_id: str) -> list[str]:
    m = _SHARD.match(path)
    if m is None:
        return [path]
    count = int(m["count"])
    names = [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"{repo_id}: split set of {path} is incomplete in the repository; missing {missing}")
    return names


def _match(pattern: str, files: list[str], repo_id: str) -> str:
    hits = [f for f in files if fnmatch.fnmatch(f, pattern)]
    if not hits:
        raise ValueError(f"No file found in {repo_id} that match {pattern}\n\nAvailable Files:\n{json.dumps(files)}")
    sets = {_SHARD.sub(r"\g<stem>-of-\g<count>", h) for h in hits}
    if len(hits) > 1 and not (len(sets) == 1 and all(_SHARD.match(h) for h in hits)):
        raise ValueError(
            f"Multiple files found in {repo_id} matching {pattern}\n\nAvailable Files:\n{json.dumps(hits)}"
        )
    return sorted(hits)[0]


def download(
    repo_id: str,
    filename: str | None,
    *,
    additional_files: list[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Download the model (all shards) and `additional_files`; returns the local path of the first file."""
    hub = _hub()
    hub.validate_repo_id(repo_id)
    files = hub.HfApi().list_repo_files(repo_id, revision=revision, token=token)
    if not filename:
        models = _models(files)
        if len(models) != 1:
            raise ValueError(
                f"{repo_id} holds {len(models)} GGUF models; pass filename= one of them (a shard name or a glob):\n"
                + "\n".join(models)
                if models
                else f"{repo_id} holds no .gguf file\n\nAvailable Files:\n{files}"
            )
        main = models[0]
    else:
        main = _match(filename, files, repo_id)
    wanted = _shards(main, files, repo_id)
    for pattern in additional_files or []:
        for extra in _shards(_match(pattern, files, repo_id), files, repo_id):
            if extra not in wanted:
                wanted.append(extra)
    paths = [
        hub.hf_hub_download(
            repo_id=repo_id, filename=f, revision=revision, token=token, local_dir=local_dir, cache_dir=cache_dir
        )
        for f in wanted
    ]
    return paths[0]
