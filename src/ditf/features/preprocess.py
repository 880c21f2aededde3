"""Images in, model-ready pixels out: decoding, colour conversion and resizing to the model's stride."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ditf.errors import ImageError, InvalidArgumentError

MAX_PIXELS = 100_000_000
"""Largest image (width x height) read by default: larger files are refused before they are decoded (a 192 MP
image would need ~0.6 GB as 8-bit RGB and far more as features). Raise it per call (`max_pixels=`) or on the
command line (`--max-pixels`)."""

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
"""A path, a PIL image, an (H, W[, C]) numpy array or a (C, H, W) tensor (uint8/uint16 or float in [0, 1])."""


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the VAE.

    `pixels` is (1, 3, H, W) fp32 in [-1, 1]; `original_size` and `resized_size` are (height, width) in
    pixels; with square padding the resized image sits at the top-left of a square canvas and
    `padded_size` is that canvas, else `padded_size == resized_size`.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    name: str


def load_image(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """Decode any supported input into an 8-bit RGB PIL image.

    EXIF orientation is applied; grayscale is replicated to RGB; alpha is composited over white;
    16-bit and float data are rescaled, never clipped. Files larger than `max_pixels` (default `MAX_PIXELS`)
    are refused before decoding.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file {str(path)!r} does not exist. Check the path.")
        try:
            with Image.open(path) as opened:
                _check_pixels(opened.size, limit, str(path))
                opened.load()
                pil = ImageOps.exif_transpose(opened)
        except Image.DecompressionBombError as err:
            raise ImageError(_too_large(str(path), None, limit)) from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageError(f"image file {str(path)!r} is corrupt or not an image ({err}). Replace the file.") from err
        return _pil_to_rgb(pil)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ImageError(f"an image tensor must be (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}.")
        return _array_to_rgb(image.detach().cpu().permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(f"cannot read an image from a {type(image).__name__}; pass a path, PIL image, numpy array or tensor.")


def _check_pixels(size: tuple[int, int], limit: int, name: str) -> None:
    if size[0] * size[1] > limit:
        raise ImageError(_too_large(name, size, limit))


def _too_large(name: str, size: tuple[int, int] | None, limit: int) -> str:
    dims = f" is {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels," if size else " is"
    return (f"image {name!r}{dims} larger than the limit of {limit / 1e6:.0f} megapixels; resize it, or raise the "
            "limit with --max-pixels (max_pixels= in Python).")


def _pil_to_rgb(pil: Image.Image) -> Image.Image:
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(pil))
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return pil.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}.")
    if array.dtype == np.uint8:
        scaled = array.astype(np.float64) / 255.0
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float64) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        scaled = array.astype(np.float64) / max(float(array.max()), 1.0)
    else:
        scaled = array.astype(np.float64)
        if scaled.min() < 0.0 or scaled.max() > 1.0:
            raise ImageError(f"a float image must lie in [0, 1]; got values in [{scaled.min():.3g}, {scaled.max():.3g}].")
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    if scaled.shape[-1] == 4:
        alpha = scaled[..., 3:]
        scaled = scaled[..., :3] * alpha + (1.0 - alpha)
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), mode="RGB")


def target_size(original_size: tuple[int, int], resolution: int, stride: int) -> tuple[int, int]:
    """(height, width) with the long side scaled to `resolution`, each side rounded to a multiple of `stride`."""
    height, width = original_size
    scale = resolution / max(height, width)
    return (max(stride, round(height * scale / stride) * stride), max(stride, round(width * scale / stride) * stride))


def prepare_image(image: ImageInput, stride: int, resolution: int | None = None, size: tuple[int, int] | None = None,
                  pad_square: bool = False) -> PreparedImage:
    """Load, resize and normalise one image for a model whose feature stride is `stride` pixels.

    The long side goes to `resolution` (aspect kept, sides rounded to the stride, bicubic as PIL's default
    in the DiTF code) unless `size` = (height, width) is given, which must be multiples of the stride.
    `pad_square` pads the resized image with black at the bottom/right to a `resolution` square.
    """
    name = str(image) if isinstance(image, (str, Path)) else type(image).__name__
    pil = load_image(image)
    original = (pil.height, pil.width)
    if min(original) < stride:
        raise ImageError(
            f"image {name!r} is {pil.width}x{pil.height} pixels, smaller than one {stride}-pixel patch of this model. "
            f"Use an image of at least {stride}x{stride} pixels."
        )
    if size is not None:
        if any(int(s) <= 0 or int(s) % stride for s in size):
            raise InvalidArgumentError(f"size={tuple(size)} must be positive multiples of the model stride {stride}.")
        resized = (int(size[0]), int(size[1]))
    elif resolution is None:
        raise InvalidArgumentError("give resolution (the long image side in pixels) or size (height, width) for images.")
    elif resolution < stride:
        raise InvalidArgumentError(f"resolution={resolution!r} must be at least the model stride {stride} pixels.")
    else:
        resized = target_size(original, resolution, stride)
    pil = pil.resize((resized[1], resized[0]), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)[None]
    padded = resized
    if pad_square:
        side = max(resized) if size is not None else max(resized + (resolution,))
        side = -(-side // stride) * stride
        canvas = torch.full((1, 3, side, side), -1.0)
        canvas[..., : resized[0], : resized[1]] = pixels
        pixels, padded = canvas, (side, side)
    return PreparedImage(pixels.contiguous(), original, resized, padded, name)
