"""DINOv2 (Oquab et al., 2023) patch-token maps, as a baseline for the harness.

The protocol of the correspondence papers' DINOv2 baseline (SD-DINO, github.com/Junyi42/sd-dino @b85df18,
`extractor_dino.py`; GeoAware-SC): the image is resized with LANCZOS so that its sides are multiples of
the 14-pixel patch (840 px for 60x60 cells), normalised with the ImageNet mean and std, and the patch
tokens of the last transformer block (the "token" facet: the block output, before the model's final
LayerNorm; class and register tokens dropped) form the (C, h, w) map. `final_norm=True` instead takes
DINOv2's own `x_norm_patchtokens` (after the final LayerNorm). Position embeddings are interpolated to
the grid by the transformers model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ditf.baselines.dift import resolve_model_folder, with_overrides
from ditf.errors import ImageError, InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from ditf.features.featurizer import check_dtype_on_device
from ditf.features.preprocess import ImageInput, load_image, target_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Pixel normalisation of DINOv2 (its `make_normalize_transform` defaults) and of SD-DINO's extractor."""

DINOV2_MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
"""transformers `model_type` values this featurizer loads, and their model classes."""


@dataclass(frozen=True)
class Dinov2Settings:
    """`resolution`: long image side in pixels (sides rounded to the patch size; SD-DINO / GeoAware-SC: 840).
    `final_norm`: apply the model's final LayerNorm to the last block's tokens (False: SD-DINO's token facet)."""

    resolution: int = 840
    final_norm: bool = False

    def describe(self, model: str, dtype: torch.dtype) -> dict:
        """JSON-able settings for a results file or a cache key, with the fixed parts of the protocol."""
        return {"extractor": "dinov2", "model": model, "dtype": str(dtype).removeprefix("torch."),
                "layer": "last block output, patch tokens (class and register tokens dropped)", **asdict(self),
                "resize": "long side to resolution, sides rounded to the patch size (LANCZOS)",
                "pixels": f"ImageNet mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}"}


class Dinov2Featurizer:
    """Last-block patch-token maps of a transformers DINOv2 model (with or without registers).

    Calling it on images returns (B, C, h, w) fp32 maps on the CPU, h = H / 14 and w = W / 14 of the
    resized image (C = 768 for ViT-B/14, 1024 for ViT-L/14). `prompt` and `seed` are accepted and
    ignored, so it can stand wherever a DiTFeaturizer does.
    """

    def __init__(self, model: nn.Module, *, settings: Dinov2Settings | None = None, model_name: str = "custom"):
        check_dinov2_model(model)
        self.model = model.eval()
        self.defaults = settings or Dinov2Settings()
        self.model_name = model_name
        self._check_resolution(self.defaults.resolution)

    @classmethod
    def from_pretrained(cls, model: str = "facebook/dinov2-base", *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **settings: Any) -> "Dinov2Featurizer":
        """Load a DINOv2 model from a hub id (`facebook/dinov2-base`, `facebook/dinov2-large`, ...) or a folder
        with a transformers `config.json` of model type dinov2 / dinov2_with_registers.

        Weights are cast to `torch_dtype` (default float32). `settings` (resolution, final_norm) replace the
        `Dinov2Settings` defaults.
        """
        import transformers

        folder = resolve_model_folder(model, "a transformers DINOv2 model folder (with config.json)")
        config_file = folder / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type not in DINOV2_MODEL_TYPES:
            found = (f"its config.json has model_type {model_type!r}" if config_file.is_file()
                     else "it has no config.json")
            raise UnknownModelError(
                f"model {model!r} is not a DINOv2 model: {found}; expected one of {sorted(DINOV2_MODEL_TYPES)}. "
                "Pass facebook/dinov2-base, facebook/dinov2-large or a folder saved from a transformers Dinov2Model."
            )
        network = getattr(transformers, DINOV2_MODEL_TYPES[model_type]).from_pretrained(folder)
        network = network.to(torch_dtype or torch.float32)
        fx = cls(network, settings=with_overrides(Dinov2Settings(), settings), model_name=model)
        return fx.place(device)

    # ------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the model's weights."""
        return next(self.model.parameters()).dtype

    @property
    def patch_size(self) -> int:
        """Pixels per feature cell (14 for the released DINOv2 models)."""
        return int(self.model.config.patch_size)

    def place(self, device: str | torch.device | None = None) -> "Dinov2Featurizer":
        """Move the model to `device` (default: CUDA when available, else CPU)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_dtype_on_device(self.dtype, device)
        self.model.to(device)
        return self

    def settings(self) -> dict:
        """JSON-able description of the default extraction (model, layer, resolution, final_norm, ...)."""
        return self.defaults.describe(self.model_name, self.dtype)

    # ------------------------------------------------------------ features
    def preprocess(self, image: ImageInput, resolution: int | None = None) -> torch.Tensor:
        """Normalised pixels (1, 3, H, W), fp32: long side to `resolution`, both sides multiples of the patch size."""
        resolution = self.defaults.resolution if resolution is None else resolution
        self._check_resolution(resolution)
        pil = load_image(image)
        if min(pil.size) < self.patch_size:
            raise ImageError(f"image {_name(image)!r} is {pil.width}x{pil.height} pixels, smaller than one "
                             f"{self.patch_size}-pixel patch. Use an image at least {self.patch_size} pixels a side.")
        height, width = target_size((pil.height, pil.width), resolution, self.patch_size)
        resized = np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
        pixels = (resized - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()

    def patch_tokens(self, pixels: torch.Tensor, final_norm: bool | None = None) -> torch.Tensor:
        """Last-block patch tokens of normalised pixels (1, 3, H, W) as a map (C, H/14, W/14), fp32 on the CPU."""
        final_norm = self.defaults.final_norm if final_norm is None else final_norm
        height, width = (side // self.patch_size for side in pixels.shape[-2:])
        skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        with torch.no_grad(), block_output(self.model.encoder.layer[-1]) as captured:
            self.model(pixel_values=pixels.to(self.device, self.dtype))
            tokens = self.model.layernorm(captured[0]) if final_norm else captured[0]
        patches = tokens[0, skip:].float()
        return patches.reshape(height, width, -1).permute(2, 0, 1).contiguous().cpu()

    def __call__(self, images: ImageInput | Sequence[ImageInput], prompt: Any = None, *, seed: Any = None,
                 resolution: int | None = None, final_norm: bool | None = None,
                 progress: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Patch-token maps of each image: (B, C, h, w) fp32 on the CPU; a list of (C, h, w) if sizes differ.

        `resolution` and `final_norm` default to the featurizer's `defaults`; `prompt` and `seed` are ignored.
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        quiet = not progress or len(images) < 2
        results = [self.patch_tokens(self.preprocess(image, resolution), final_norm)
                   for image in tqdm(images, desc="DINOv2 features", unit="image", disable=quiet)]
        if len({tuple(r.shape) for r in results}) > 1:
            return results
        return torch.stack(results)

    def _check_resolution(self, resolution: Any) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < self.patch_size:
            raise InvalidArgumentError(
                f"resolution={resolution!r} is invalid: use an integer long side of at least one patch "
                f"({self.patch_size} px); SD-DINO and GeoAware-SC use 840 (60x60 cells)."
            )


@contextmanager
def block_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states `module` (a transformer layer) outputs while the context is open."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured.append(output if isinstance(output, torch.Tensor) else output[0])

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def check_dinov2_model(model: nn.Module) -> None:
    """Fail unless `model` is a transformers Dinov2Model or Dinov2WithRegistersModel."""
    if type(model).__name__ not in DINOV2_MODEL_TYPES.values():
        raise UnsupportedLayoutError(
            f"Dinov2Featurizer needs a transformers {' or '.join(DINOV2_MODEL_TYPES.values())}, got "
            f"{type(model).__name__}. Load one with Dinov2Featurizer.from_pretrained('facebook/dinov2-base')."
        )


def _name(image: ImageInput) -> str:
    return str(image) if isinstance(image, (str, Path)) else type(image).__name__


__all__ = ["DINOV2_MODEL_TYPES", "Dinov2Featurizer", "Dinov2Settings", "IMAGENET_MEAN", "IMAGENET_STD", "block_output",
           "check_dinov2_model"]
