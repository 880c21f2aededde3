"""Where per-image feature maps come from: a folder of precomputed maps, or an extractor behind a cache.

Both sources hand out (C, h, w) floating-point maps for an `ImageRecord`, say whether they already have
one (`available`), whether they can make one (`can_compute`), and which file holds it (`path_for`), so
that scoring processes can read the maps without the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ditf.errors import DatasetError
from ditf.eval.cache import FEATURES_KEY, FeatureCache, cache_key, file_sha256
from ditf.eval.keypoints import ImageRecord
from ditf.eval.prompts import PromptPolicy
from ditf.features.io import check_feature_map, load_features, read_feature_header


class Extractor(Protocol):
    """Anything that turns one image into a (C, h, w) feature map: `ditf.eval.DiTFExtractor`, a baseline, ..."""

    prompt_mode: str
    """The prompt policy its published numbers used ("class", "empty" or "caption")."""

    def __call__(self, image: Image.Image | Path, prompt: str) -> torch.Tensor:
        """The (C, h, w) feature map of `image` (a PIL image or a path) under `prompt`."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON values that identify the features it makes (model and every setting): the cache key's part."""
        ...


class FeatureSource(Protocol):
    """Anything that yields a (C, h, w) feature map per image."""

    can_compute: bool
    missing_hint: str  # how to provide features that are missing, for error messages

    def load(self, image: ImageRecord) -> torch.Tensor:
        """The (C, h, w) feature map of `image`."""
        ...

    def available(self, image: ImageRecord) -> bool:
        """True if `load` needs no computation."""
        ...

    def inspect(self, image: ImageRecord) -> tuple[int, int, int]:
        """(C, h, w) of an available map, checked from its header without reading the data."""
        ...

    def path_for(self, image: ImageRecord) -> Path:
        """The feature file that holds (or will hold) `image`'s map."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings entry for the results JSON."""
        ...


class FeatureFolder:
    """Precomputed maps in `root/<image group>/<image stem>.safetensors` (tensor `features`, (C, h, w)), or,
    with `flat` and when the folder has no such subfolders, `root/<image stem>.safetensors` (what
    `ditf features -o root` writes for images of one folder).

    The group is the SPair category, the PF-Pascal class, the AP-10K species, the HPatches sequence or the
    ADE20K split of the image; `group` names it in messages.
    """

    can_compute = False

    def __init__(self, root: str | Path, *, group: str = "category", flat: bool = True):
        self.root = Path(root)
        self.flat = flat
        layout = f"<{group}>/<image stem>.safetensors"
        self.missing_hint = (f"write them as {self.root}/{layout} (tensor '{FEATURES_KEY}', (C, h, w)), "
                             "e.g. with `ditf features <images> -o DIR`")
        if not self.root.is_dir():
            raise DatasetError(
                f"features folder {self.root} does not exist; pass the folder that holds {layout} files as --features"
            )

    def path_for(self, image: ImageRecord) -> Path:
        """The file expected to hold `image`'s features: in its group's subfolder, else (with `flat`) directly in
        the root."""
        grouped = self.root / image.group / f"{image.stem}.safetensors"
        flat = self.root / f"{image.stem}.safetensors"
        return flat if self.flat and not grouped.parent.is_dir() and flat.is_file() else grouped

    def available(self, image: ImageRecord) -> bool:
        """True if the feature file exists."""
        return self.path_for(image).is_file()

    def inspect(self, image: ImageRecord) -> tuple[int, int, int]:
        """(C, h, w) of `image`'s map from the file header; DatasetError if missing or malformed."""
        return read_feature_header(self.path_for(image)).shape

    def load(self, image: ImageRecord) -> torch.Tensor:
        """Read and check `image`'s map; DatasetError for a missing, unreadable or malformed file."""
        return load_features(self.path_for(image))[0]

    def describe(self) -> dict:
        """Settings entry for the results JSON."""
        return {"source": "features folder", "features": str(self.root)}


class CachedExtractor:
    """Features from an `Extractor`, cached on disk.

    Entries are keyed by the image's content hash, everything `extractor.describe()` reports and the prompt
    (see `ditf.eval.cache`). `storage_dtype` (e.g. torch.float16) shrinks the cache; maps are always
    returned as stored, so a fresh and a resumed run see identical features. With `cache_only` the
    extractor is never called (the scoring step after sharded extraction). `image_hashes` (path -> SHA-256)
    lets several sources over the same images hash each image once.
    """

    def __init__(
        self,
        extractor: Extractor,
        cache_dir: str | Path,
        prompts: Callable[[ImageRecord], str] | None = None,
        storage_dtype: torch.dtype | None = None,
        cache_only: bool = False,
        image_hashes: dict[Path, str] | None = None,
    ):
        self.extractor = extractor
        self.cache = FeatureCache(cache_dir, storage_dtype)
        self.settings = {**extractor.describe(),
                         "stored_as": str(storage_dtype).removeprefix("torch.") if storage_dtype else "as extracted"}
        self.prompts = prompts or PromptPolicy("empty")
        self.can_compute = not cache_only
        self.missing_hint = (f"run the extraction for every --shard i/n (same settings, cache {self.cache.root}) "
                             "before scoring with --cache-only")
        self._image_hashes = {} if image_hashes is None else image_hashes

    def key_for(self, image: ImageRecord) -> str:
        """Cache key of `image` under this extractor's settings and prompt policy."""
        if not image.path.is_file():
            raise DatasetError(f"image {image.path} does not exist; check the dataset root")
        if image.path not in self._image_hashes:
            self._image_hashes[image.path] = file_sha256(image.path)
        return cache_key(self._image_hashes[image.path], self.settings, self.prompts(image))

    def path_for(self, image: ImageRecord) -> Path:
        """The cache entry of `image` (whether or not it exists yet)."""
        return self.cache.path_for(self.key_for(image))

    def available(self, image: ImageRecord) -> bool:
        """True if a complete cache entry exists for `image`."""
        return self.cache.contains(self.key_for(image))

    def inspect(self, image: ImageRecord) -> tuple[int, int, int]:
        """(C, h, w) of `image`'s cached map from the entry header."""
        return read_feature_header(self.path_for(image)).shape

    def load(self, image: ImageRecord) -> torch.Tensor:
        """Cached map of `image`, extracting and storing it first if absent or corrupt."""
        key = self.key_for(image)
        cached = self.cache.load(key)
        if cached is not None:
            return cached
        if not self.can_compute:
            raise DatasetError(
                f"no cached features for {image.path} under {self.cache.root}; run the extraction "
                "(without --cache-only, or every --shard) first"
            )
        with self.cache.lock(key):
            cached = self.cache.load(key)  # another process may have computed it while this one waited
            if cached is not None:
                return cached
            prompt = self.prompts(image)
            features = check_feature_map(self.extractor(image.path, prompt), f"extractor output for {image.path}")
            return self.cache.store(key, features, settings=self.settings,
                                    metadata={"image": str(image.path), "prompt": prompt})

    def describe(self) -> dict:
        """Settings entry for the results JSON."""
        return {"source": "extractor", **self.settings, "prompt_mode": getattr(self.prompts, "mode", "custom"),
                "cache": str(self.cache.root)}
