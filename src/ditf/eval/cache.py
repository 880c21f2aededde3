"""A content-addressed, crash-safe cache of per-image feature maps.

An entry's key is the SHA-256 of the image's bytes, every extraction setting and the prompt, so a
changed image, model, block, timestep, prompt, ... never reads a stale entry. Entries are single
safetensors files (tensor `features`, (C, h, w)) written to a temporary file in the same folder
and moved into place with `os.replace`, so a killed run leaves either a complete entry or none.
Each entry records the SHA-256 of its tensor bytes; an entry that is truncated or whose bytes do
not match is reported as corrupt and treated as missing (the caller recomputes and overwrites it).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from ditf.errors import InvalidArgumentError
from ditf.io import write_bytes_atomic

FEATURES_KEY = "features"
CACHE_FORMAT = "ditf-feature-cache-1"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CorruptCacheEntryWarning(UserWarning):
    """A cache entry could not be read back intact and will be recomputed."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes (any dtype, made contiguous)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def cache_key(image_sha256: str, settings: Mapping, prompt: str) -> str:
    """Hex SHA-256 of the canonical JSON of the image hash, every setting and the prompt."""
    payload = {"format": CACHE_FORMAT, "image": image_sha256, "settings": dict(settings), "prompt": prompt}
    try:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise InvalidArgumentError(
            f"cache settings must be JSON values (str, int, float, bool, None, lists, dicts), got {settings!r}: {err}"
        ) from err
    return hashlib.sha256(canonical.encode()).hexdigest()


class FeatureCache:
    """Feature maps stored under `root/<key[:2]>/<key>.safetensors`.

    `storage_dtype` (e.g. torch.float16) casts maps before storing; None keeps their dtype.
    """

    def __init__(self, root: str | Path, storage_dtype: torch.dtype | None = None):
        self.root = Path(root)
        self.storage_dtype = storage_dtype

    def path_for(self, key: str) -> Path:
        """Where the entry of `key` lives (whether or not it exists)."""
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        """True if a complete entry exists (its header parses); bytes are checked by `load`."""
        path = self.path_for(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                return FEATURES_KEY in handle.keys()
        except (SafetensorError, OSError):
            return False

    def load(self, key: str) -> torch.Tensor | None:
        """The cached (C, h, w) map of `key`, or None if absent or corrupt (with a warning)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                features = handle.get_tensor(FEATURES_KEY)
        except (SafetensorError, OSError) as err:
            return self._corrupt(path, f"cannot be read ({err})")
        if metadata.get("tensor_sha256") != tensor_sha256(features):
            return self._corrupt(path, "its bytes do not match the checksum it was written with")
        return features

    def store(self, key: str, features: torch.Tensor, metadata: Mapping[str, str] | None = None) -> torch.Tensor:
        """Write `features` (C, h, w) atomically under `key`; returns the tensor as stored."""
        stored = features.detach().cpu().contiguous()
        if self.storage_dtype is not None:
            stored = stored.to(self.storage_dtype)
        header = {str(k): str(v) for k, v in (metadata or {}).items()}
        header.update({"format": CACHE_FORMAT, "tensor_sha256": tensor_sha256(stored)})
        write_bytes_atomic(self.path_for(key), save_safetensors({FEATURES_KEY: stored}, metadata=header))
        return stored

    def _corrupt(self, path: Path, reason: str) -> None:
        warnings.warn(f"feature cache entry {path} {reason}; it will be recomputed", CorruptCacheEntryWarning, stacklevel=3)
        return None
