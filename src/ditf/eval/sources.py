"""Where per-image feature maps come from: a folder of precomputed maps, or an extractor + cache.

Both sources hand out (C, h, w) floating-point maps for an `ImageRecord` and say whether they
already have one (`available`) and whether they can make one (`can_compute`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.cache import FEATURES_KEY, FeatureCache, cache_key, file_sha256
from ditf.eval.keypoints import ImageRecord

FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PROMPT_MODES = ("empty", "class", "caption")
CLASS_PROMPT = "a photo of a {category}"

ExtractFn = Callable[[Path, str], torch.Tensor]
HEADER_DTYPES = ("F16", "BF16", "F32", "F64")  # FEATURE_DTYPES as safetensors headers name them


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


def _shape_message(where: str, shape: tuple[int, ...]) -> str:
    return (f"{where}: feature map has shape {tuple(shape)}; expected (C, h, w) with no batch axis "
            "(save features[0] for a batch of one)")


def _dtype_message(where: str, dtype: object) -> str:
    return (f"{where}: feature map has dtype {dtype}; expected one of float16, bfloat16, float32, float64 "
            "(cast it before saving)")


def check_feature_map(features: object, where: str) -> torch.Tensor:
    """Return `features` if it is a non-empty (C, h, w) float tensor, else DatasetError naming `where`."""
    if not isinstance(features, torch.Tensor):
        raise DatasetError(f"{where}: expected a (C, h, w) tensor, got {type(features).__name__}")
    if features.ndim != 3 or min(features.shape) < 1:
        raise DatasetError(_shape_message(where, tuple(features.shape)))
    if features.dtype not in FEATURE_DTYPES:
        raise DatasetError(_dtype_message(where, features.dtype))
    return features


def read_feature_header(path: Path) -> tuple[int, int, int]:
    """(C, h, w) of the `features` tensor of a safetensors file, checked (shape and dtype) from the
    header alone. DatasetError for an unreadable file, a missing tensor, a wrong shape or dtype."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if FEATURES_KEY not in names:
                raise DatasetError(f"{path} holds tensors {names} but no '{FEATURES_KEY}'; rename the feature tensor")
            header = handle.get_slice(FEATURES_KEY)
            shape, dtype = tuple(header.get_shape()), header.get_dtype()
    except SafetensorError as err:
        raise DatasetError(f"{path} is not a readable safetensors file ({err}); rewrite it") from err
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(_shape_message(str(path), shape))
    if dtype not in HEADER_DTYPES:
        raise DatasetError(_dtype_message(str(path), dtype))
    return shape


class FeatureFolder:
    """Precomputed maps in `root/<image group>/<image stem>.safetensors`, tensor `features` (C, h, w).

    The group is the SPair category, the PF-Pascal class or the AP-10K species of the image.
    """

    can_compute = False

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.missing_hint = f"write them as {self.root}/<category>/<image stem>.safetensors (tensor '{FEATURES_KEY}')"
        if not self.root.is_dir():
            raise DatasetError(
                f"features folder {self.root} does not exist; pass the folder that holds "
                "<category>/<image stem>.safetensors files as --features"
            )

    def path_for(self, image: ImageRecord) -> Path:
        """The file expected to hold `image`'s features."""
        return self.root / image.group / f"{image.stem}.safetensors"

    def available(self, image: ImageRecord) -> bool:
        """True if the feature file exists."""
        return self.path_for(image).is_file()

    def inspect(self, image: ImageRecord) -> tuple[int, int, int]:
        """(C, h, w) of `image`'s map from the file header; DatasetError if missing or malformed."""
        path = self.path_for(image)
        if not path.is_file():
            raise DatasetError(
                f"no features for image {image.path.name}: {path} does not exist; write a safetensors file "
                f"with a tensor named '{FEATURES_KEY}' of shape (C, h, w) there"
            )
        return read_feature_header(path)

    def load(self, image: ImageRecord) -> torch.Tensor:
        """Read and check `image`'s map; DatasetError for a missing, unreadable or malformed file."""
        self.inspect(image)
        path = self.path_for(image)
        try:
            with safe_open(str(path), framework="pt") as handle:
                features = handle.get_tensor(FEATURES_KEY)
        except SafetensorError as err:
            raise DatasetError(f"{path} is not a readable safetensors file ({err}); rewrite it") from err
        return check_feature_map(features, str(path))

    def describe(self) -> dict:
        """Settings entry for the results JSON."""
        return {"source": "features folder", "features": str(self.root)}


def load_captions(path: str | Path) -> dict[str, str]:
    """Per-image captions in the DiTF authors' format: a JSON object {category + image file name: caption}
    (e.g. "car2008_007466.jpg")."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file {path} does not exist; pass the JSON file given to --captions")
    try:
        captions = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"captions file {path} is not valid JSON ({err})") from err
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise DatasetError(
            f"captions file {path} must be a JSON object mapping '<category><image file name>' to a caption string"
        )
    return captions


def prompt_for(
    image: str, category: str, mode: str = "class", captions: Mapping[str, str] | None = None
) -> str:
    """The prompt for image file name `image` (e.g. "2008_007466.jpg") of `category`.

    mode "empty" -> "", "class" -> "a photo of a {category}", "caption" -> captions[category + image]
    (the DiTF authors' key format).
    """
    if mode == "empty":
        return ""
    if mode == "class":
        return CLASS_PROMPT.format(category=category)
    if mode == "caption":
        if captions is None:
            raise InvalidArgumentError("prompt mode 'caption' needs a captions mapping; pass --captions FILE")
        key = f"{category}{image}"
        if key not in captions:
            raise DatasetError(
                f"no caption for image {image} of category {category}: key {key!r} is not in the captions file "
                f"({len(captions)} keys); use --prompt-mode class or add the caption"
            )
        return captions[key]
    raise InvalidArgumentError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")


class PromptPolicy:
    """Chooses each image's prompt: `mode` in PROMPT_MODES, `captions` for mode "caption"."""

    def __init__(self, mode: str = "empty", captions: Mapping[str, str] | None = None):
        if mode not in PROMPT_MODES:
            raise InvalidArgumentError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
        if mode == "caption" and captions is None:
            raise InvalidArgumentError("prompt mode 'caption' needs captions; pass --captions FILE")
        self.mode = mode
        self.captions = captions

    def __call__(self, image: ImageRecord) -> str:
        return prompt_for(image.path.name, image.group, self.mode, self.captions)


class CachedExtractor:
    """Features from `extract_fn(image_path, prompt) -> (C, h, w)`, cached on disk.

    Entries are keyed by the image's content hash, every entry of `settings` and the prompt (see
    `ditf.eval.cache`). `storage_dtype` (e.g. torch.float16) shrinks the cache; maps are always
    returned as stored, so a fresh and a resumed run see identical features. With `cache_only` the
    extractor never calls `extract_fn` (the scoring step after sharded extraction).
    """

    def __init__(
        self,
        extract_fn: ExtractFn,
        cache_dir: str | Path,
        settings: Mapping,
        prompts: Callable[[ImageRecord], str] | None = None,
        storage_dtype: torch.dtype | None = None,
        cache_only: bool = False,
    ):
        self.extract_fn = extract_fn
        self.cache = FeatureCache(cache_dir, storage_dtype)
        self.settings = dict(settings)
        self.prompts = prompts or PromptPolicy("empty")
        self.can_compute = not cache_only
        self.missing_hint = (f"run the extraction for every --shard i/n (same settings, cache {self.cache.root}) "
                             "before scoring with --cache-only")
        self._image_hashes: dict[Path, str] = {}

    def key_for(self, image: ImageRecord) -> str:
        """Cache key of `image` under this extractor's settings and prompt policy."""
        if not image.path.is_file():
            raise DatasetError(f"image {image.path} does not exist; check the dataset root")
        if image.path not in self._image_hashes:
            self._image_hashes[image.path] = file_sha256(image.path)
        return cache_key(self._image_hashes[image.path], self.settings, self.prompts(image))

    def available(self, image: ImageRecord) -> bool:
        """True if a complete cache entry exists for `image`."""
        return self.cache.contains(self.key_for(image))

    def inspect(self, image: ImageRecord) -> tuple[int, int, int]:
        """(C, h, w) of `image`'s cached map from the entry header."""
        return read_feature_header(self.cache.path_for(self.key_for(image)))

    def load(self, image: ImageRecord) -> torch.Tensor:
        """Cached map of `image`, extracting and storing it first if absent or corrupt."""
        key = self.key_for(image)
        cached = self.cache.load(key)
        if cached is not None:
            return check_feature_map(cached, str(self.cache.path_for(key)))
        if not self.can_compute:
            raise DatasetError(
                f"no cached features for {image.path} under {self.cache.root}; run the extraction "
                "(without --cache-only, or every --shard) first"
            )
        prompt = self.prompts(image)
        features = check_feature_map(self.extract_fn(image.path, prompt), f"extractor output for {image.path}")
        metadata = {"image": str(image.path), "prompt": prompt, "settings": json.dumps(self.settings, sort_keys=True)}
        return self.cache.store(key, features, metadata)

    def describe(self) -> dict:
        """Settings entry for the results JSON."""
        return {"source": "extractor", **self.settings, "prompt_mode": getattr(self.prompts, "mode", "custom"),
                "cache": str(self.cache.root)}
