"""ditf: dense visual features from Diffusion Transformers (DiTF) and massive-activation tools.

`import ditf` is cheap: the names below are imported on first use (PEP 562), so torch, diffusers and
matplotlib load only when a model, an evaluation or a figure needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ditf.lazy import lazy_exports

_EXPORTS = {
    "DiTFeaturizer": "ditf.features.featurizer",
    "FeatureResult": "ditf.features.featurizer",
    "FeatureSettings": "ditf.settings",
    "resolve_settings": "ditf.settings",
    "DitfError": "ditf.errors",
    "PRESETS": "ditf.registry",
    "Preset": "ditf.registry",
    "get_preset": "ditf.registry",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from ditf.errors import DitfError
    from ditf.features.featurizer import DiTFeaturizer, FeatureResult
    from ditf.registry import PRESETS, Preset, get_preset
    from ditf.settings import FeatureSettings, resolve_settings


_exported, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from ditf.versions import ditf_version

        return ditf_version()
    return _exported(name)
