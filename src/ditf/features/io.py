"""Feature files: one safetensors file per image, tensor `features` (C, h, w), settings in the metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ditf.errors import DatasetError
from ditf.io import atomic_path


def save_features(path: str | Path, features: torch.Tensor, settings: dict[str, Any], half: bool = False) -> Path:
    """Write `features` (C, h, w) to `path` atomically, with `settings` (JSON-able) in the file's metadata.

    `half=True` stores fp16 (half the size; cosine matching is insensitive to it)."""
    path = Path(path)
    tensor = features.detach().to(torch.float16 if half else torch.float32).contiguous().cpu()
    metadata = {"settings": json.dumps(settings, sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file({"features": tensor}, temporary, metadata=metadata)
    return path


def load_features(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a feature file: (features (C, h, w) fp32, settings dict; empty if the file has none)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"feature file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if "features" not in handle.keys():
                raise DatasetError(f"feature file {str(path)!r} has no tensor named 'features' (found {list(handle.keys())}).")
            tensor = handle.get_tensor("features")
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DatasetError(f"feature file {str(path)!r} is corrupt ({err}); delete it to recompute it.") from err
    if tensor.ndim != 3:
        raise DatasetError(f"feature file {str(path)!r} holds a tensor of shape {tuple(tensor.shape)}; expected (C, h, w).")
    return tensor.float(), json.loads(metadata.get("settings", "{}"))
