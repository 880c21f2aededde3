"""The DiTF settings the app's controls choose, and the feature variants it offers."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ditf.errors import InvalidArgumentError

VARIANTS: dict[str, dict[str, Any]] = {
    "raw": {"normalize": False, "modulate": False, "discard": None},
    "ln": {"normalize": True, "modulate": False, "discard": None},
    "adaln": {"normalize": True, "modulate": True, "discard": None},
    "ditf": {"normalize": True, "modulate": True, "discard": "auto"},
}
"""Variant name -> the featurizer's post-processing switches. raw: the ensemble-mean block input;
ln: + LayerNorm; adaln: + the block's AdaLN modulation; ditf: + massive channels zeroed first."""

MAX_ENSEMBLE = 64
MAX_RESOLUTION = 2048


@dataclass(frozen=True)
class FeatureSettings:
    """One extraction setting: global block index, timestep t in 0..1000, number of noise draws, long
    image side in pixels, variant (a key of `VARIANTS`), prompt and seed. Hashable: a cache key."""

    block: int
    t: float
    ensemble: int
    resolution: int
    variant: str = "ditf"
    prompt: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidArgumentError(f"variant {self.variant!r} is not one of {sorted(VARIANTS)}; pick one of those.")
        if self.block < 0:
            raise InvalidArgumentError(f"block {self.block} is negative; use a global block index from 0.")
        if not (math.isfinite(self.t) and 0 <= self.t <= 1000):
            raise InvalidArgumentError(f"t {self.t} is outside 0..1000; DiTF uses 261 for correspondence.")
        if not 1 <= self.ensemble <= MAX_ENSEMBLE:
            raise InvalidArgumentError(f"ensemble {self.ensemble} is outside 1..{MAX_ENSEMBLE}; DiTF uses 8.")
        if not 16 <= self.resolution <= MAX_RESOLUTION:
            raise InvalidArgumentError(
                f"resolution {self.resolution} is outside 16..{MAX_RESOLUTION} pixels; DiTF uses 640 for FLUX."
            )

    @classmethod
    def from_controls(cls, block: Any, t: Any, ensemble: Any, resolution: Any, variant: Any = "ditf",
                      prompt: Any = "", seed: Any = 0) -> "FeatureSettings":
        """Build from the values of UI controls (numbers may arrive as floats or None)."""
        values = {"block": block, "t": t, "ensemble": ensemble, "resolution": resolution, "seed": seed}
        for name, value in values.items():
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError(f"{name} is {value!r}; enter a number.")
        for name in ("block", "ensemble", "resolution", "seed"):
            if float(values[name]) != int(values[name]):
                raise InvalidArgumentError(f"{name} {values[name]} is not a whole number; enter an integer.")
        return cls(block=int(block), t=float(t), ensemble=int(ensemble), resolution=int(resolution),
                   variant=str(variant), prompt=str(prompt or ""), seed=int(seed))

    def with_variant(self, variant: str) -> "FeatureSettings":
        """The same setting with another variant."""
        return replace(self, variant=variant)

    def featurizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `DiTFeaturizer.__call__` for this setting."""
        return {"prompt": self.prompt, "block": self.block, "t": self.t, "ensemble": self.ensemble,
                "resolution": self.resolution, "seed": self.seed, **VARIANTS[self.variant]}

    def describe(self) -> str:
        """One line for captions: 'block 28, t=261, ensemble 2, 256 px, ditf'."""
        return f"block {self.block}, t={self.t:g}, ensemble {self.ensemble}, {self.resolution} px, {self.variant}"


SMOKE_SETTINGS = FeatureSettings(block=28, t=261, ensemble=2, resolution=256)
"""The demo settings of `./run.sh demo` for the random-weight smoke model."""


def preset_settings(model: str) -> FeatureSettings | None:
    """The preset's settings when `model` is a preset alias or a known hub id, else None."""
    from ditf.registry import PRESETS, preset_for_hub_id

    preset = PRESETS.get(model) or preset_for_hub_id(model)
    if preset is None:
        return None
    return FeatureSettings(block=preset.block, t=float(preset.t), ensemble=preset.ensemble,
                           resolution=preset.resolution, prompt=preset.prompt)
