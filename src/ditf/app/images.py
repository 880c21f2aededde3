"""Uploaded images: size limit, decoding, and a content hash that keys the feature cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ditf.errors import ImageError

MAX_PIXELS = 4096 * 4096
"""Largest image the app accepts, in pixels (width x height): 16.8 megapixels, e.g. 4096 x 4096."""


@dataclass(frozen=True)
class LoadedImage:
    """An 8-bit RGB image with its content hash (SHA-256 of the size and pixels, hex) and a display name."""

    image: Image.Image
    digest: str
    name: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.height, self.image.width


def load_upload(source: str | Path | Image.Image | Any, name: str | None = None) -> LoadedImage:
    """Decode an uploaded file path (or anything `ditf.features.preprocess.load_image` reads) into an
    RGB `LoadedImage`. Raises `ImageError` for a non-image, or for an image over `MAX_PIXELS` (checked
    from the file header, before the pixels are decoded)."""
    from ditf.features.preprocess import load_image

    label = name or (Path(source).name if isinstance(source, (str, Path)) else type(source).__name__)
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as header:
                width, height = header.size
        except FileNotFoundError as err:
            raise ImageError(f"image {label!r} does not exist any more; upload it again.") from err
        except Exception as err:  # PIL raises several types for non-images, including decompression bombs
            raise ImageError(
                f"{label!r} is not an image PIL can read ({type(err).__name__}); upload a JPEG, PNG or WebP."
            ) from err
        _check_pixels(label, width, height)
    try:
        image = load_image(source)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{label!r} could not be decoded ({type(err).__name__}: {err}); upload another file.") from err
    _check_pixels(label, image.width, image.height)
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
    return LoadedImage(image=image, digest=digest, name=label)


def _check_pixels(label: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image {label!r} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the app's limit of "
            f"{MAX_PIXELS / 1e6:.1f} megapixels; downscale it (features use at most a few hundred pixels per side)."
        )
