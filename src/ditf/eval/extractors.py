"""Extractors for the benchmarks: DiTF features of a model under `FeatureSettings`, and the frame wrapper
that feeds GeoAware-SC's zero-padded square images to any extractor.

An extractor is a callable `(image, prompt) -> (C, h, w)` with `describe()` (what identifies its features,
for cache keys and results files) and `prompt_mode` (its published prompt policy). The model is loaded on
the first extraction, so a run served from the cache never loads it.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ditf.errors import InvalidArgumentError
from ditf.features.io import tensor_sha256
from ditf.fingerprint import model_identity
from ditf.eval.sources import Extractor
from ditf.features.preprocess import ImageInput, load_image
from ditf.registry import preset_for
from ditf.settings import VARIANTS, FeatureSettings, default_dtype, dtype_name, resolve_settings, task_protocol

if TYPE_CHECKING:
    from ditf.features.featurizer import DiTFeaturizer


def default_device() -> str:
    """cuda:<LOCAL_RANK> when CUDA is available (one GPU per process under torchrun / accelerate), else cpu."""
    if torch.cuda.is_available():
        rank = os.environ.get("LOCAL_RANK", "0")
        if not rank.strip().isdigit():
            raise InvalidArgumentError(f"$LOCAL_RANK is {rank!r}, not a whole number; unset it or pass a device.")
        return f"cuda:{int(rank)}"
    return "cpu"


def default_cache_dir() -> Path:
    """$DITF_CACHE_DIR/features, or ~/.cache/ditf/features."""
    return Path(os.environ.get("DITF_CACHE_DIR", Path.home() / ".cache" / "ditf")).expanduser() / "features"


class DiTFExtractor:
    """DiTF features of one model for the benchmarks.

    `model` is a model reference (alias, hub id, folder or file; loaded on first use, only up to the settings'
    block) or a loaded `DiTFeaturizer`. The settings are `settings`, or the model's preset for `task` changed by
    `overrides` (`FeatureSettings` fields, plus `variant`: raw, ln, adaln or ditf, the paper's ablation rows).
    `dtype` ("fp32", "bf16", "fp16"; default bf16 on CUDA, fp32 elsewhere), `device`, `offload`, `config` and
    `variant_files` (weight variant such as "fp16") are how the model is loaded.
    """

    def __init__(self, model: str | DiTFeaturizer, settings: FeatureSettings | None = None, *, task: str | None = None,
                 device: str | None = None, dtype: str | None = None, offload: str | None = None,
                 config: str | None = None, variant_files: str | None = None, variant: str | None = None,
                 **overrides: Any):
        if variant is not None:
            if variant not in VARIANTS:
                raise InvalidArgumentError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}.")
            overrides = {**VARIANTS[variant], **overrides}
        if isinstance(model, str):
            from ditf.loading import check_model

            check_model(model, needs=("transformer", "vae"), config=config)
            self._handle: dict[str, DiTFeaturizer | None] = {"featurizer": None}
            self.model, preset = model, preset_for(model)
            self.device = device or default_device()
            dtype = dtype or default_dtype(self.device)
        else:
            self._handle = {"featurizer": model}
            self.model, preset = model.model, model.preset
            self.device = str(model.device)
            dtype = dtype_name(model.dtype)
        if settings is None:
            settings = resolve_settings(preset, task=task, model=self.model, dtype=dtype, **overrides)
        elif overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self.prompt_mode = task_protocol(preset, task).get("prompt_mode", "empty") if task else "empty"
        self._load = dict(offload=offload, config=config, variant=variant_files, block=settings.load_up_to)
        self._identity: dict[str, Any] | None = None

    @property
    def featurizer(self) -> DiTFeaturizer:
        """The loaded featurizer (loaded now, with only the blocks up to the settings' block, if it was not yet);
        extractors made with `with_settings` share it."""
        if self._handle["featurizer"] is None:
            from ditf.features.featurizer import load_featurizer

            self._handle["featurizer"] = load_featurizer(self.model, device=self.device, dtype=self.settings.dtype,
                                                         **self._load)
        return self._handle["featurizer"]

    def with_settings(self, **changes: Any) -> DiTFExtractor:
        """The same model (loaded once, shared) with changed settings, e.g. one block of a multi-block sweep."""
        other = copy.copy(self)
        other.settings = self.settings.replace(**changes)
        deepest, loaded = other.settings.load_up_to, self._load["block"]
        if loaded is not None and (deepest is None or deepest > loaded):
            raise InvalidArgumentError(f"block={other.settings.block} is beyond the blocks this extractor loads "
                                       f"(0..{loaded}); make an extractor with that block instead.")
        return other

    def describe(self) -> dict[str, Any]:
        """The model reference and what it resolves to (`ditf.fingerprint.model_identity`: changed weights give
        another identity), every setting (JSON values), and the ablation row they compute."""
        if self._identity is None:
            self._identity = self._model_identity()
        return {"extractor": "ditf", **self.settings.to_dict(), "variant": self.settings.variant,
                "model_identity": self._identity}

    def _model_identity(self) -> dict[str, Any]:
        if self.model is not None:
            return model_identity(self.model, config=self._load["config"])
        digest = hashlib.sha256()  # a featurizer built from modules in memory: its weights are its identity
        for name, tensor in sorted(self.featurizer.transformer.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor_sha256(tensor).encode())
        return {"kind": "in-memory", "weights_sha256": digest.hexdigest()}

    def __call__(self, image: ImageInput, prompt: str = "") -> torch.Tensor:
        """The (C, h, w) DiTF feature map of `image` under `prompt` (fp32, CPU)."""
        settings = self.settings.replace(prompt=prompt) if prompt != self.settings.prompt else self.settings
        return self.featurizer.extract(image, settings=settings).features


class SquarePadded:
    """An extractor fed GeoAware-SC's frame: the image resized (LANCZOS) to long side `side` and zero-padded
    evenly to a `side` x `side` square (their `resize(..., edge=False)`), in memory."""

    def __init__(self, extractor: Extractor, side: int):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise InvalidArgumentError(f"pad size {side!r} must be a positive number of pixels.")
        self.extractor = extractor
        self.side = side
        self.prompt_mode = extractor.prompt_mode

    def describe(self) -> dict[str, Any]:
        """The wrapped extractor's description with the frame."""
        return {**self.extractor.describe(), "frame": f"square_pad_{self.side}"}

    def __call__(self, image: ImageInput, prompt: str = "") -> torch.Tensor:
        return self.extractor(square_padded(load_image(image), self.side), prompt)


def square_padded(image: Image.Image, side: int) -> Image.Image:
    """`image` resized (LANCZOS) to long side `side` and zero-padded evenly to `side` x `side` (GeoAware-SC)."""
    width, height = image.size
    if height <= width:
        resized = image.resize((side, int(np.around(side * height / width))), Image.Resampling.LANCZOS)
        top, left = (side - resized.size[1]) // 2, 0
    else:
        resized = image.resize((int(np.around(side * width / height)), side), Image.Resampling.LANCZOS)
        top, left = 0, (side - resized.size[0]) // 2
    canvas = Image.new("RGB", (side, side))
    canvas.paste(resized, (left, top))
    return canvas
