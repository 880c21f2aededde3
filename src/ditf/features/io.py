"""Feature files: one safetensors file per image, tensor `features` (C, h, w), what made it in the metadata.

The one reader and writer of feature maps in ditf: `ditf features` output, the evaluation feature cache and
feature folders given to `ditf eval --features` all go through here. Every file ditf writes carries the
SHA-256 of its tensor bytes (`tensor_sha256`), so a truncated or altered file is caught when read back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from ditf.errors import DatasetError
from ditf.io import write_bytes_atomic

FEATURES_KEY = "features"
FORMAT = "ditf-features-1"
FEATURE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
"""Floating-point dtypes a feature map may have, by their safetensors header names."""


@dataclass(frozen=True)
class FeatureHeader:
    """What a feature file's header says: `shape` (C, h, w), safetensors `dtype` name, and its string metadata."""

    shape: tuple[int, int, int]
    dtype: str
    metadata: dict[str, str]

    path: str = ""

    @property
    def settings(self) -> dict[str, Any]:
        """The settings recorded with the map (empty when the file has none); DatasetError when they are unreadable."""
        try:
            settings = json.loads(self.metadata.get("settings", "{}"))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{self.path}: its recorded settings are not JSON ({err.msg}); delete the file to "
                               "recompute it.") from err
        if not isinstance(settings, dict):
            raise DatasetError(f"{self.path}: its recorded settings are not a JSON object; delete the file to recompute it.")
        return settings


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes (any dtype, made contiguous)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def save_features(path: str | Path, features: torch.Tensor, *, settings: Mapping[str, Any] | None = None,
                  metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Write `features` (C, h, w) to `path` atomically, cast to `dtype` (default: as given), with `settings`
    (JSON-able) and further string `metadata` in the header. Returns the tensor as stored."""
    stored = check_feature_map(features, str(path)).detach().cpu().contiguous()
    if dtype is not None:
        stored = stored.to(dtype)
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    if settings is not None:
        header["settings"] = json.dumps(dict(settings), sort_keys=True)
    header.update({"format": FORMAT, "tensor_sha256": tensor_sha256(stored)})
    write_bytes_atomic(path, save_safetensors({FEATURES_KEY: stored}, metadata=header))
    return stored


def read_feature_header(path: str | Path) -> FeatureHeader:
    """(C, h, w), dtype and metadata of the `features` tensor of a safetensors file, checked from the header
    alone. DatasetError for a missing or unreadable file, a missing tensor, a wrong shape or dtype."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"feature file {path} does not exist; write a safetensors file with a tensor named "
                           f"'{FEATURES_KEY}' of shape (C, h, w) there.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if FEATURES_KEY not in names:
                raise DatasetError(f"{path} holds tensors {names} but no '{FEATURES_KEY}'; rename the feature tensor.")
            view = handle.get_slice(FEATURES_KEY)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise DatasetError(f"{path} is not a readable safetensors file ({err}); delete or rewrite it.") from err
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(_shape_message(str(path), shape))
    if dtype not in FEATURE_DTYPES:
        raise DatasetError(_dtype_message(str(path), dtype))
    return FeatureHeader(shape, dtype, metadata, str(path))


def load_features(path: str | Path) -> tuple[torch.Tensor, FeatureHeader]:
    """Read and check a feature file: (the map (C, h, w) as stored, its header). The checksum is verified when
    the file has one; a mismatch, like a truncated file, is a DatasetError that says to delete the file."""
    path = Path(path)
    header = read_feature_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            features = handle.get_tensor(FEATURES_KEY)
    except (SafetensorError, OSError) as err:
        raise DatasetError(f"{path} is not a readable safetensors file ({err}); delete or rewrite it.") from err
    expected = header.metadata.get("tensor_sha256")
    if expected is not None and expected != tensor_sha256(features):
        raise DatasetError(f"{path} is corrupt: its bytes do not match the checksum it was written with; delete it.")
    return check_feature_map(features, str(path)), header


def check_feature_map(features: object, where: str) -> torch.Tensor:
    """`features` if it is a non-empty (C, h, w) floating-point tensor of finite values, else DatasetError
    naming `where` (a file or the extractor that produced it)."""
    if not isinstance(features, torch.Tensor):
        raise DatasetError(f"{where}: expected a (C, h, w) tensor, got {type(features).__name__}")
    if features.ndim != 3 or min(features.shape) < 1:
        raise DatasetError(_shape_message(where, tuple(features.shape)))
    if features.dtype not in FEATURE_DTYPES.values():
        raise DatasetError(_dtype_message(where, str(features.dtype).removeprefix("torch.")))
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).sum())
        raise DatasetError(f"{where}: {bad} feature values are NaN or infinite; recompute the features (in float32 if "
                           "they overflowed in float16).")
    return features


def _shape_message(where: str, shape: tuple[int, ...]) -> str:
    return (f"{where}: feature map has shape {tuple(shape)}; expected (C, h, w) with no batch axis "
            "(save features[0] for a batch of one)")


def _dtype_message(where: str, dtype: object) -> str:
    return (f"{where}: feature map has dtype {dtype}; expected one of float16, bfloat16, float32, float64 "
            "(cast it before saving)")
