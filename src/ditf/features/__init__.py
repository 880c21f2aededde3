"""DiTF feature extraction: preprocessing, the featurizer, pure post-processing functions, and DINOv2 fusion.

`fuse` (`ditf.features.fusion`) and `FusionSettings` (`ditf.features.fusion_settings`) are imported on first use (PEP 562).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"fuse": "ditf.features.fusion", "FusionSettings": "ditf.features.fusion_settings"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditf.features' has no attribute {name!r}")
