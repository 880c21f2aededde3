"""Baseline feature extractors for the evaluation harness: DIFT (SD-2.1 UNet) and DINOv2 (ViT-B/14, ViT-L/14).

Each baseline has the call convention of `DiTFeaturizer`, `fx(images, prompt=..., seed=..., resolution=...)
-> (B, C, h, w)`, and a `settings()` dict for results files. `BASELINES` names them with their hub ids,
defaults and where those come from; `BaselineExtractor` is an evaluation `Extractor` (`(image, prompt) -> (C, h, w)`
with `describe()` and `prompt_mode`) that loads the model only when a feature is first needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Union

import torch

from ditf.baselines.dift import DIFT_HUB_ID, DiftFeaturizer, DiftSettings, with_overrides
from ditf.baselines.dinov2 import Dinov2Featurizer, Dinov2Settings
from ditf.errors import InvalidArgumentError
from ditf.features.preprocess import ImageInput
from ditf.fingerprint import model_identity

BaselineFeaturizer = Union[DiftFeaturizer, Dinov2Featurizer]


@dataclass(frozen=True)
class Baseline:
    """A named baseline: which extractor, which weights, its default settings, prompt mode and provenance.

    `prompt_mode` is the evaluation prompt policy the published numbers used ("class": "a photo of a
    {category}"; "empty": the extractor ignores prompts).
    """

    name: str
    extractor: str
    hub_id: str
    settings: DiftSettings | Dinov2Settings
    prompt_mode: str
    source: str

    def featurizer_class(self) -> type[DiftFeaturizer] | type[Dinov2Featurizer]:
        """The featurizer class that runs this baseline."""
        return DiftFeaturizer if self.extractor == "dift" else Dinov2Featurizer


_DIFT_CODE = ("DIFT authors' SPair code (github.com/Tsingularity/dift @9421eb2: eval_spair.py, "
              "sd_featurizer_spair.py): "
              "SD-2.1, up_ft_index 1, t=261, ensemble 8, 768x768, prompt 'a photo of a {category}'. Weights: the code "
              "loads stabilityai/stable-diffusion-2-1, removed from the hub in Nov 2025 (diffusers#12874); "
              f"{DIFT_HUB_ID} is an unofficial community mirror")
_SD_DINO_CODE = ("SD-DINO's DINOv2 extractor (github.com/Junyi42/sd-dino @b85df18, extractor_dino.py; "
                 "also GeoAware-SC): "
                 "ViT-B/14, 'token' facet of the last block (layer 11), 840 px, LANCZOS, ImageNet mean/std")

BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in [
        Baseline("dift", "dift", DIFT_HUB_ID, DiftSettings(t=261, up_block=1, ensemble=8, resolution=768, seed=0),
                 "class", _DIFT_CODE),
        Baseline("dinov2-b14", "dinov2", "facebook/dinov2-base", Dinov2Settings(resolution=840, final_norm=False),
                 "empty", _SD_DINO_CODE),
        Baseline("dinov2-l14", "dinov2", "facebook/dinov2-large", Dinov2Settings(resolution=840, final_norm=False),
                 "empty", _SD_DINO_CODE + "; applied unchanged to ViT-L/14 (last block 23): no published setting"),
    ]
}


def get_baseline(name: str) -> Baseline:
    """The baseline called `name`; an unknown name lists the known ones."""
    if name not in BASELINES:
        raise InvalidArgumentError(
            f"unknown baseline {name!r}. Known baselines: {', '.join(BASELINES)}. For DiT features use --model instead."
        )
    return BASELINES[name]


def baseline_settings(name: str, model: str | None = None, torch_dtype: torch.dtype | None = None,
                      **overrides: Any) -> dict:
    """The `settings()` dict that `baseline_from_name(name, torch_dtype, model=model, **overrides)` will report,
    computed without loading the model (for cache keys). Invalid `overrides` raise InvalidArgumentError."""
    baseline = get_baseline(name)
    settings = with_overrides(baseline.settings, overrides)
    return settings.describe(model or baseline.hub_id, torch_dtype or torch.float32)


def baseline_from_name(name: str, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                       model: str | None = None, **overrides: Any) -> BaselineFeaturizer:
    """Load baseline `name` ("dift", "dinov2-b14", "dinov2-l14") from its hub id, or from `model` (a hub id or
    a local folder) with the baseline's defaults; `overrides` change settings (DIFT: t, up_block, ensemble,
    resolution, seed; DINOv2: resolution, final_norm)."""
    baseline = get_baseline(name)
    settings = with_overrides(baseline.settings, overrides)
    featurizer_class = baseline.featurizer_class()
    return featurizer_class.from_pretrained(model or baseline.hub_id, torch_dtype=torch_dtype, device=device,
                                            **asdict(settings))


class BaselineExtractor:
    """An evaluation `Extractor` for baseline `name`: `(image, prompt) -> (C, h, w)`, loading the model on first use.

    `describe()` (available without loading) is the JSON-able dict to key the cache with and to report.
    """

    def __init__(self, name: str, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 model: str | None = None, **overrides: Any):
        self.name = name
        self.settings = baseline_settings(name, model, torch_dtype, **overrides)
        self.prompt_mode = get_baseline(name).prompt_mode
        self.device = str(device) if device is not None else "cpu"
        self._load = lambda: baseline_from_name(name, torch_dtype, device, model, **overrides)
        self._featurizer: BaselineFeaturizer | None = None

    @property
    def featurizer(self) -> BaselineFeaturizer:
        """The loaded featurizer (loaded now if it was not yet)."""
        if self._featurizer is None:
            self._featurizer = self._load()
        return self._featurizer

    def describe(self) -> dict:
        """The baseline's name, settings (JSON values) and what its weights resolve to (`model_identity`)."""
        return {"baseline": self.name, **self.settings, "model_identity": model_identity(self.settings["model"])}

    def __call__(self, image: ImageInput, prompt: str = "") -> torch.Tensor:
        """Feature map (C, h, w), fp32 on the CPU, of `image` (a path or PIL image) under this baseline's settings."""
        return self.featurizer([image], prompt=prompt, progress=False)[0]


__all__ = ["BASELINES", "Baseline", "BaselineExtractor", "BaselineFeaturizer", "DIFT_HUB_ID", "DiftFeaturizer",
           "DiftSettings", "Dinov2Featurizer", "Dinov2Settings", "baseline_from_name", "baseline_settings",
           "get_baseline"]
