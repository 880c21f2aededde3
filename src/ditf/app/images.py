"""Uploaded images: decoded under the app's pixel limit, with a content hash that keys the feature store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditf.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 4096 * 4096
"""The app's default largest upload in pixels (width x height), 16.8 megapixels: every click computes a
full-resolution cosine map per target, so the page refuses what `ditf.features.preprocess.MAX_PIXELS` (for
files on disk) would accept. `ditf app --max-pixels` changes it."""


@dataclass(frozen=True)
class LoadedImage:
    """An 8-bit RGB image, its content hash (hex SHA-256 of its size and pixels) and a display name."""

    image: Image.Image
    digest: str
    name: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.height, self.image.width


def load_upload(source: str | Path | Any, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Decode an upload (a file path, or anything `ditf.features.preprocess.load_image` reads) into a
    `LoadedImage`. `ImageError` names the file for a non-image, a vanished file, or an image over `max_pixels`
    (refused from the file header, before the pixels are decoded)."""
    from ditf.features.preprocess import load_image

    name = Path(source).name if isinstance(source, (str, Path)) else type(source).__name__
    try:
        image = load_image(source, max_pixels=max_pixels)
    except ImageError as err:
        raise ImageError(f"upload {name!r}: {err}") from err
    except Exception as err:  # decoders raise many types for broken files; the page shows a message instead
        raise ImageError(f"upload {name!r} could not be decoded ({type(err).__name__}: {err}); upload a JPEG, "
                         "PNG or WebP image.") from err
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
    return LoadedImage(image=image, digest=digest, name=name)
