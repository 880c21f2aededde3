"""The app's memory: one loaded featurizer, feature maps and prepared match targets, each cached.

Feature maps are keyed by (image content hash, model, settings) and prepared targets
(`ditf.matching.correspondence.prepare_target`) by the same key plus the image size, so a click on
images seen before runs no model and no per-target preparation.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from ditf.app.images import LoadedImage, load_upload
from ditf.app.settings import FeatureSettings
from ditf.errors import DitfError, UnknownModelError
from ditf.matching.correspondence import UpsampledTarget, prepare_target

FeaturizerLoader = Callable[[str, int], Any]
"""(model, block) -> a loaded `DiTFeaturizer` holding at least blocks 0..block."""

Value = TypeVar("Value")


class LruCache(Generic[Value]):
    """A dict that keeps the `capacity` most recently used entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Value | None:
        """The entry (now the most recent) or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Hashable, value: Value) -> Value:
        """Store `value`, dropping the least recently used entry when full; returns `value`."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class StoreCounters:
    """How often the expensive steps ran (for tests and the page's status line)."""

    model_loads: int = 0
    extractions: int = 0
    preparations: int = 0


def pretrained_loader(device: str | None = None, dtype: torch.dtype | None = None) -> FeaturizerLoader:
    """A loader calling `DiTFeaturizer.from_pretrained(model, block=block)` on `device` (default: CUDA when
    available) in `dtype` (default: bf16 on CUDA, fp32 on CPU)."""

    def load(model: str, block: int) -> Any:
        from ditf import DiTFeaturizer

        placement = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = dtype or (torch.bfloat16 if placement.type == "cuda" else torch.float32)
        return DiTFeaturizer.from_pretrained(model, torch_dtype=weights, device=placement, block=block)

    return load


class FeatureStore:
    """Loads one featurizer at a time and caches what the app computes with it. Thread-safe: callbacks
    may run concurrently; model work is serialised by one lock."""

    def __init__(self, loader: FeaturizerLoader | None = None, *, max_features: int = 32, max_targets: int = 16,
                 max_images: int = 64):
        self.loader = loader or pretrained_loader()
        self.counters = StoreCounters()
        self._lock = threading.RLock()
        self._featurizer: Any = None
        self._loaded: tuple[str, int] | None = None
        self._features: LruCache[torch.Tensor] = LruCache(max_features)
        self._targets: LruCache[UpsampledTarget] = LruCache(max_targets)
        self._images: LruCache[LoadedImage] = LruCache(max_images)

    @contextmanager
    def single_threaded(self) -> Iterator[None]:
        """Run the block with one torch intra-op thread and no model work alongside.

        A click multiplies a (1, C) vector by (C, h*w) matrices: too small to share between threads,
        and on a busy two-core machine the threads' hand-offs made it 5-10x slower (benchmarks/app.py)."""
        with self._lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(threads)

    def image(self, path: str | Path) -> LoadedImage:
        """The decoded upload at `path`, cached by (path, modification time, size)."""
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        key = (str(path), stat.st_mtime_ns, stat.st_size) if stat else None
        cached = self._images.get(key) if key else None
        if cached is not None:
            return cached
        loaded = load_upload(path)
        return self._images.put(key, loaded) if key else loaded

    def featurizer(self, model: str, block: int) -> Any:
        """The featurizer of `model` with at least blocks 0..`block` loaded; (re)loads only when the model
        changes or a deeper block is asked for. A failed load raises `UnknownModelError` naming the model."""
        with self._lock:
            if self._loaded is not None and self._loaded[0] == model and self._loaded[1] >= block:
                return self._featurizer
            self._featurizer, self._loaded = None, None  # free the old weights before loading new ones
            try:
                featurizer = self.loader(model, block)
            except DitfError:
                raise
            except Exception as err:
                raise UnknownModelError(
                    f"model {model!r} failed to load ({type(err).__name__}: {err}); give a preset alias such as "
                    "flux-dev, a hub id, or a local diffusers folder."
                ) from err
            self.counters.model_loads += 1
            self._featurizer, self._loaded = featurizer, (model, block)
            return featurizer

    def features(self, image: LoadedImage, model: str, settings: FeatureSettings) -> torch.Tensor:
        """DiTF features (C, h, w) fp32 on the CPU of `image` under `model` and `settings`, cached."""
        key = (image.digest, model, settings)
        cached = self._features.get(key)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._features.get(key)
            if cached is not None:
                return cached
            fx = self.featurizer(model, settings.block)
            feats = fx([image.image], progress=False, **settings.featurizer_kwargs())[0]
            self.counters.extractions += 1
            return self._features.put(key, feats.detach().float().cpu())

    def put_features(self, image: LoadedImage, model: str, settings: FeatureSettings, feats: torch.Tensor) -> None:
        """Seed the cache with features computed elsewhere (benchmarks, tests, a features file)."""
        self._features.put((image.digest, model, settings), feats.detach().float().cpu())

    def prepared_target(self, image: LoadedImage, model: str, settings: FeatureSettings) -> UpsampledTarget:
        """`prepare_target` of the image's features at its full size, cached. The features are stored in
        float64 so each click skips the conversion (the matcher computes in float64 anyway)."""
        key = (image.digest, model, settings, image.size)
        cached = self._targets.get(key)
        if cached is not None:
            return cached
        feats = self.features(image, model, settings)
        with self._lock:
            prepared = prepare_target(feats.to(torch.float64), image.size)
            self.counters.preparations += 1
            return self._targets.put(key, prepared)
