"""DiTF feature extraction: preprocessing, the featurizer, pure post-processing functions, and DINOv2 fusion.

`fuse` (`ditf.features.fusion`) and `FusionSettings` (`ditf.features.fusion_settings`) are imported on first use (PEP 562).
"""

from __future__ import annotations

from ditf.lazy import lazy_exports

_EXPORTS = {"fuse": "ditf.features.fusion", "FusionSettings": "ditf.features.fusion_settings"}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
