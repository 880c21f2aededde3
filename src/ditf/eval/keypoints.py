"""Shared types of the correspondence benchmarks: images, keypoint pairs, datasets, frames.

Coordinates are (x, y) pixels of the original image unless a frame says otherwise; sizes are (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ditf.errors import DatasetError


@dataclass(frozen=True)
class ImageRecord:
    """One image of a benchmark.

    `group` names the folder its features live in (`<features>/<group>/<stem>.safetensors`) and the
    category its prompt uses: the SPair category, the PF-Pascal class, the AP-10K species.
    """

    path: Path
    group: str
    size: tuple[int, int]  # (H, W) in pixels

    @property
    def stem(self) -> str:
        """File name without extension, e.g. `2008_002719`."""
        return self.path.stem

    @property
    def key(self) -> str:
        """`<group>/<stem>`: unique within a benchmark."""
        return f"{self.group}/{self.stem}"


@dataclass(frozen=True)
class KeypointPair:
    """A source/target image pair with corresponding keypoints.

    `source_points` and `target_points` are (P, 2) float64 (x, y) pixels in the original images,
    row i of one corresponding to row i of the other. `target_bbox` is (x1, y1, x2, y2) corners in
    target pixels, or None when the benchmark has no boxes. `flags` holds per-pair integer
    annotations (SPair's variation flags).
    """

    name: str
    category: str
    source: ImageRecord
    target: ImageRecord
    source_points: np.ndarray
    target_points: np.ndarray
    target_bbox: tuple[float, float, float, float] | None = None
    flags: dict[str, int] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        """Number of keypoint correspondences P."""
        return int(self.source_points.shape[0])


@dataclass
class CorrespondenceDataset:
    """The pairs of one benchmark split, grouped by evaluation `categories` (sorted)."""

    name: str
    root: Path
    split: str
    pairs: list[KeypointPair]
    categories: list[str]
    alphas: tuple[float, ...]
    default_threshold: str  # "bbox" or "image"
    subset: str | None = None

    def images(self) -> list[ImageRecord]:
        """Every image used by a pair, once, sorted by key (a deterministic order for sharding)."""
        unique = {}
        for pair in self.pairs:
            unique.setdefault(pair.source.key, pair.source)
            unique.setdefault(pair.target.key, pair.target)
        return [unique[key] for key in sorted(unique)]

    def describe(self) -> dict:
        """Name, split, subset, root and counts, for the results JSON."""
        return {
            "name": self.name,
            "split": self.split,
            "subset": self.subset,
            "root": str(self.root),
            "pairs": len(self.pairs),
            "images": len(self.images()),
            "points": int(sum(pair.num_points for pair in self.pairs)),
            "categories": list(self.categories),
        }


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header. DatasetError if missing or unreadable."""
    if not path.is_file():
        raise DatasetError(f"image {path} does not exist; check the dataset root and that the download is complete")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"image {path} cannot be read ({err}); re-download the file") from err
    return height, width


def require_paths(dataset: str, root: Path, required: list[str], how_to_get: str) -> None:
    """DatasetError naming every missing entry of `required` (relative to `root`) and the fix."""
    if not root.is_dir():
        raise DatasetError(f"{dataset} root {root} is not a directory. {how_to_get}")
    missing = [entry for entry in required if not (root / entry).exists()]
    if missing:
        raise DatasetError(f"{dataset} root {root} lacks {', '.join(missing)}. {how_to_get}")


@dataclass(frozen=True)
class Frame:
    """The pixel frame in which a protocol matches and measures errors.

    A point p of the original image sits at `p * scale + offset` in the frame; `size` (H, W) is the
    frame's extent. The identity frame (scale 1, offset 0, size = image size) is the DiTF protocol;
    `square_pad` is GeoAware-SC's resize-long-side-then-zero-pad-to-a-square.
    """

    size: tuple[int, int]
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)  # (x, y)

    @classmethod
    def identity(cls, image_size: tuple[int, int]) -> Frame:
        """The original image itself."""
        return cls(size=image_size)

    @classmethod
    def square_pad(cls, image_size: tuple[int, int], side: int) -> Frame:
        """GeoAware-SC: long side resized to `side`, short side zero-padded evenly to a square.

        Offsets follow its keypoint transform: new_short = round(side * short / long) (numpy's
        round-half-to-even) and offset = int((side - new_short) / 2).
        """
        height, width = image_size
        scale = side / max(width, height)
        if height < width:
            offset = (0.0, float(int((side - round(side * height / width)) / 2)))
        elif width < height:
            offset = (float(int((side - round(side * width / height)) / 2)), 0.0)
        else:
            offset = (0.0, 0.0)
        return cls(size=(side, side), scale=scale, offset=offset)

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """(P, 2) original (x, y) -> (P, 2) frame (x, y), float64."""
        return np.asarray(points, dtype=np.float64) * self.scale + np.asarray(self.offset)

    def from_frame(self, points: np.ndarray) -> np.ndarray:
        """(P, 2) frame (x, y) -> (P, 2) original (x, y), float64."""
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.offset)) / self.scale
