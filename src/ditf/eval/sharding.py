"""Sharded extraction: each process fills the feature cache for its share of a benchmark's images.

A share is a fixed function of the image keys, so shards are disjoint, cover every image and do not depend
on the process that computes them; scoring then reads the merged cache without running the model.
"""

from __future__ import annotations

import os

from ditf.errors import InvalidArgumentError
from ditf.eval.keypoints import CorrespondenceDataset, ImageRecord
from ditf.eval.scoring import ensure_features
from ditf.eval.sources import FeatureSource


def parse_shard(text: str | tuple[int, int]) -> tuple[int, int]:
    """"i/n" (0 <= i < n) or (i, n) -> (i, n); "auto" reads RANK and WORLD_SIZE as set by `accelerate launch`
    or `torchrun` (0/1 when absent)."""
    if isinstance(text, tuple):
        index, count = text
    elif text == "auto":
        index, count = _environment_int("RANK", 0), _environment_int("WORLD_SIZE", 1)
    else:
        head, sep, tail = str(text).partition("/")
        try:
            index, count = int(head), int(tail)
        except ValueError:
            index, count = -1, 0
        if not sep:
            index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), or 'auto'; got {text!r}")
    return index, count


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.strip().isdigit():
        raise InvalidArgumentError(f"shard 'auto' reads ${name}, which is {value!r}, not a whole number; set it (torchrun "
                                   "and accelerate launch do) or pass --shard i/n.")
    return int(value)


def shard_images(images: list[ImageRecord], index: int, count: int) -> list[ImageRecord]:
    """Shard `index` of `count`: every count-th image of the key-sorted list, starting at `index`."""
    ordered = sorted(images, key=lambda image: image.key)
    return ordered[index::count]


def extract_shard(dataset: CorrespondenceDataset, source: FeatureSource, shard: str | tuple[int, int],
                  progress: bool = True) -> dict:
    """Fill `source`'s cache for shard `shard` ("i/n", (i, n) or "auto") of `dataset`'s images.

    Returns {"shard": "i/n", "images": this shard's count, "extracted": newly computed, "missing_in_dataset":
    images of the whole dataset still without features}.
    """
    return extract_shard_of(dataset.images(), source, shard, progress)


def extract_shard_of(images: list[ImageRecord], source: FeatureSource, shard: str | tuple[int, int],
                     progress: bool = True) -> dict:
    """`extract_shard` over a list of images (HPatches, ADE20K)."""
    index, count = parse_shard(shard)
    mine = shard_images(images, index, count)
    computed = ensure_features(mine, source, progress)
    still_missing = sum(not source.available(image) for image in images)
    return {"shard": f"{index}/{count}", "images": len(mine), "extracted": computed,
            "missing_in_dataset": still_missing}
