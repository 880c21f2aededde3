"""A content-addressed, crash-safe cache of per-image feature maps.

An entry's key is the SHA-256 of the image's bytes, every extraction setting and the prompt, so a
changed image, model, block, timestep, prompt, ... never reads a stale entry. Entries are feature files
(`ditf.features.io`: tensor `features` (C, h, w) with the SHA-256 of its bytes) written atomically, so a
killed run leaves either a complete entry or none. An entry that is truncated or whose bytes do not
match its checksum is reported as corrupt and treated as missing (the caller recomputes and overwrites it).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.features.io import FEATURES_KEY, load_features, read_feature_header, save_features

CACHE_FORMAT = "ditf-feature-cache-1"


class CorruptCacheEntryWarning(UserWarning):
    """A cache entry could not be read back intact and will be recomputed."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keyed_settings(settings: Mapping) -> dict:
    """`settings` as far as they identify features: where a `model_identity` says what the weights are, the
    `model` reference as typed ("smoke", "./smoke", an absolute path) is left out, so every spelling of one
    model folder finds the same entries."""
    if "model_identity" in settings:
        return {key: value for key, value in settings.items() if key != "model"}
    return dict(settings)


def cache_key(image_sha256: str, settings: Mapping, prompt: str) -> str:
    """Hex SHA-256 of the canonical JSON of the image hash, every setting (`keyed_settings`) and the prompt."""
    payload = {"format": CACHE_FORMAT, "image": image_sha256, "settings": keyed_settings(settings), "prompt": prompt}
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
        try:
            read_feature_header(self.path_for(key))
        except DatasetError:
            return False
        return True

    def load(self, key: str) -> torch.Tensor | None:
        """The cached (C, h, w) map of `key`, or None if absent or corrupt (with a warning)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            features, header = load_features(path)
            if "tensor_sha256" not in header.metadata:
                raise DatasetError(f"{path} has no checksum")
        except DatasetError as err:
            warnings.warn(f"corrupt feature cache entry deleted, it will be recomputed: {err}", CorruptCacheEntryWarning,
                          stacklevel=2)
            with self.lock(key):  # nobody is writing it while it goes: a later `contains` says it is missing
                path.unlink(missing_ok=True)
            return None
        return features

    def lock(self, key: str) -> Any:
        """An inter-process lock for computing `key`'s entry (a file lock beside it): a second process that wants
        the same entry waits, then finds it written."""
        from filelock import FileLock

        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path.with_name(f".{key}.lock")), is_singleton=True)  # re-entrant: `load` runs inside it

    def store(self, key: str, features: torch.Tensor, settings: Mapping | None = None,
              metadata: Mapping[str, str] | None = None) -> torch.Tensor:
        """Write `features` (C, h, w) atomically under `key`; returns the tensor as stored."""
        return save_features(self.path_for(key), features, settings=settings, metadata=metadata, dtype=self.storage_dtype)


__all__ = ["CACHE_FORMAT", "FEATURES_KEY", "CorruptCacheEntryWarning", "FeatureCache", "cache_key", "keyed_settings",
           "file_sha256"]
