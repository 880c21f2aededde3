"""ditf: dense visual features from Diffusion Transformers (DiTF) and massive-activation tools."""

from ditf.errors import DitfError
from ditf.features.featurizer import DiTFeaturizer, FeatureResult
from ditf.registry import PRESETS, Preset, get_preset

__version__ = "0.1.0"

__all__ = ["DiTFeaturizer", "DitfError", "FeatureResult", "PRESETS", "Preset", "get_preset", "__version__"]
