"""Pictures the app shows: cosine heat maps over images and point markers, as uint8 RGB arrays.

Plain numpy and PIL (no figure machinery) so that a click renders in milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

HEAT_ALPHA = 0.6
MARKER_FILL = (0, 229, 255)


@lru_cache(maxsize=1)
def inferno_lut() -> np.ndarray:
    """matplotlib's 'inferno' colour map as a (256, 3) uint8 lookup table."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round().astype(np.uint8)


def heat_overlay(image: Image.Image, cosine: torch.Tensor | np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """`image` (RGB, H x W) blended with the cosine map (H, W), min-max scaled and coloured with inferno;
    returns (H, W, 3) uint8. A map of another size is resized (bilinear) to the image first."""
    heat = cosine.detach().cpu().numpy() if isinstance(cosine, torch.Tensor) else np.asarray(cosine)
    heat = heat.astype(np.float32, copy=False)
    if heat.shape != (image.height, image.width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((image.width, image.height), Image.BILINEAR))
    low, high = float(heat.min()), float(heat.max())
    index = ((heat - low) * (255.0 / (high - low)) if high > low else np.zeros_like(heat)).astype(np.uint8)
    colours = inferno_lut()[index].astype(np.uint16)
    base = np.asarray(image, dtype=np.uint16)
    weight = round(alpha * 256)
    return ((colours * weight + base * (256 - weight)) >> 8).astype(np.uint8)


def mark_point(picture: Image.Image | np.ndarray, point: tuple[int, int], label: str | None = None) -> np.ndarray:
    """A copy of `picture` with a ringed dot (and optional label) at pixel `point` (x, y); (H, W, 3) uint8."""
    canvas = Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    x, y = point
    radius = max(4, round(min(canvas.size) / 60))
    draw.ellipse((x - radius - 2, y - radius - 2, x + radius + 2, y + radius + 2), fill=(0, 0, 0))
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=MARKER_FILL, outline=(255, 255, 255), width=2)
    if label:
        draw.text((x + radius + 4, y - radius - 4), label, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
