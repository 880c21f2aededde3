"""What a model reference points at, as a value that changes when the weights change: the key of every cache.

A hub model is its repository id and the commit it resolves to; a local folder or file is its resolved path
plus a fingerprint of its files (relative path, size, modification time, and for safetensors files a hash of
the header, which lists every tensor's name, dtype, shape and offsets). So `smoke`, `./smoke` and an absolute
path to the same folder get one identity, and changed weights get another. Nothing is loaded or downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ditf.model_files import safetensors_header
from ditf.registry import all_presets

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SKIPPED_SUFFIXES = (".tmp", ".lock", ".pyc")


def model_identity(model: str, *, config: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """JSON values identifying the weights `model` (alias, hub id, folder or single file) refers to.

    Folders and files: {"kind": "local", "path": resolved path, "fingerprint": hex}; with a single file's
    `config` folder, its fingerprint too. Hub ids and aliases: {"kind": "hub", "repo": id, "revision": the
    commit of `revision` (default "main") in the local Hugging Face cache, or on the hub when online}.
    """
    preset = all_presets().get(model)
    source = preset.hub_id if preset is not None else model
    path = Path(source).expanduser()
    if path.exists():
        identity: dict[str, Any] = {"kind": "local", "path": str(path.resolve()), "fingerprint": files_fingerprint(path)}
        if config is not None:
            identity["config"] = {"path": str(Path(config).expanduser().resolve()),
                                  "fingerprint": files_fingerprint(Path(config).expanduser())}
        return identity
    return {"kind": "hub", "repo": source, "revision": hub_commit(source, revision)}


def files_fingerprint(path: Path) -> str:
    """Hex SHA-256 over every file under `path` (or of `path` itself): relative name, size, modification time,
    and the header of safetensors files."""
    root = path.resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(root if root.is_dir() else root.parent)
        if file.name.endswith(_SKIPPED_SUFFIXES) or any(part.startswith(".") for part in name.parts):
            continue
        stat = file.stat()
        entry = {"name": str(name), "size": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns}
        if file.suffix == ".safetensors":
            entry["header"] = hashlib.sha256(safetensors_header(file)[1]).hexdigest()
        digest.update(json.dumps(entry, sort_keys=True).encode())
    return digest.hexdigest()


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set now (huggingface_hub itself reads it only once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def hub_commit(repo: str, revision: str | None = None) -> str | None:
    """The commit `revision` (default "main") of hub repository `repo` resolves to: itself when it is a commit
    hash, else from the local cache's refs, else from the hub unless HF_HUB_OFFLINE is set; None if unknown."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    if refs.is_file():
        return refs.read_text().strip()
    if hub_offline():
        return None
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return model_info(repo, revision=revision).sha
    except (HfHubHTTPError, OSError, ValueError, *_http_client_errors()):  # loading reports these with the fix
        return None


def _http_client_errors() -> tuple[type[Exception], ...]:
    """The base error classes of the HTTP clients huggingface_hub versions use (requests, httpx, httpx2)."""
    import importlib

    found = []
    for module, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return tuple(found)
