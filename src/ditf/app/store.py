"""The app's memory: how models load, the one loaded featurizer, and the one store of feature maps and
prepared match targets.

Feature maps are keyed by (image content hash, model identity, settings): the identity is
`ditf.fingerprint.model_identity` (a hub commit, or a local folder's resolved path and file fingerprint), so
`./smoke` and `/abs/smoke` share entries and changed weights do not. Prepared targets
(`ditf.matching.correspondence.prepare_target` of a map at its image's full size) have the same key. A click on
images seen before therefore runs no model and prepares no target.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from ditf.app.images import MAX_PIXELS, LoadedImage, load_upload
from ditf.errors import DitfError, InvalidArgumentError, UnknownModelError
from ditf.features.featurizer import DiTFeaturizer, FeatureResult
from ditf.matching.correspondence import UpsampledTarget, prepare_target
from ditf.registry import preset_for
from ditf.settings import VARIANTS, FeatureSettings, default_dtype, resolve_settings

MAX_ENSEMBLE = 64
"""Most noise draws a page may ask for (DiTF uses 8): a shared server should not run a 1000-member ensemble."""
MAX_RESOLUTION = 2048
"""Longest image side in pixels a page may ask for (DiTF uses 640 for FLUX)."""
CONTROLS = ("block", "t", "ensemble", "resolution")
"""The `FeatureSettings` fields the page sets with its number boxes (the variant radio sets the others)."""

Value = TypeVar("Value")


class LruCache(Generic[Value]):
    """A dict that keeps the `capacity` most recently used entries. Thread-safe."""

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
    """How often the expensive steps ran (for tests, the benchmark and the page's status line)."""

    model_loads: int = 0
    extractions: int = 0
    preparations: int = 0


class ModelLoader:
    """How the app loads a model: on `device` (default: CUDA when available, else CPU) in `dtype` ("fp32",
    "bf16", "fp16"; default bf16 on CUDA, fp32 elsewhere), with a single file's `config` folder, a weight
    `weights_variant` (e.g. "fp16") and `offload` ("model" or "sequential"), as `ditf features` does."""

    def __init__(self, device: str | None = None, dtype: str | None = None, *, config: str | None = None,
                 weights_variant: str | None = None, offload: str | None = None):
        from ditf.eval.extractors import default_device

        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.config, self.weights_variant, self.offload = config, weights_variant, offload

    def identity(self, model: str) -> str:
        """`ditf.fingerprint.model_identity` of `model` as canonical JSON (a hashable cache-key part)."""
        from ditf.fingerprint import model_identity

        return json.dumps(model_identity(model, config=self.config), sort_keys=True)

    def load(self, model: str, block: int) -> DiTFeaturizer:
        """`model` checked (`ditf.loading.check_model`) and loaded with blocks 0..`block` (all for a negative
        block)."""
        from ditf.features.featurizer import load_featurizer

        return load_featurizer(model, device=self.device, dtype=self.dtype, block=block if block >= 0 else None,
                               offload=self.offload, config=self.config, variant=self.weights_variant)


class FeatureStore:
    """Loads one featurizer at a time and keeps what the app computes with it. Thread-safe: callbacks may run
    concurrently; model work is serialised by one lock.

    `given`: `FeatureSettings` overrides that hold for every event (the command line's --prompt, --seed, ...);
    the page's controls add block, t, ensemble, resolution and the variant. `max_batch`: ensemble members per
    forward pass (None: all). `max_pixels`: the largest upload, in pixels.
    """

    def __init__(self, loader: ModelLoader | None = None, *, given: Mapping[str, Any] | None = None,
                 max_batch: int | None = None, max_pixels: int = MAX_PIXELS, max_features: int = 32,
                 max_targets: int = 16, max_images: int = 64):
        self.loader = loader or ModelLoader()
        self.given = dict(given or {})
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.counters = StoreCounters()
        self._lock = threading.RLock()
        self._featurizer: DiTFeaturizer | None = None
        self._loaded: tuple[str, int] | None = None
        self._identities: dict[str, str] = {}
        self._features: LruCache[FeatureResult] = LruCache(max_features)
        self._targets: LruCache[UpsampledTarget] = LruCache(max_targets)
        self._images: LruCache[LoadedImage] = LruCache(max_images)

    # ------------------------------------------------------------ settings
    def settings(self, model: str | None, variant: Any = "ditf", **controls: Any) -> FeatureSettings:
        """The `FeatureSettings` of the page's controls: `model`'s preset (`ditf.settings.resolve_settings`)
        changed by `given`, then by `controls` (block, t, ensemble, resolution; None: the preset's) and
        `variant` (raw, ln, adaln, ditf). Numbers may arrive as floats from the page."""
        from ditf.loading import check_model_reference

        model = (model or "").strip()
        if not model:
            raise InvalidArgumentError("the model box is empty; enter a preset alias (flux-dev), a hub id or a local "
                                       "folder.")
        check_model_reference(model)
        if variant not in VARIANTS:
            raise InvalidArgumentError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}; pick one of those.")
        unknown = sorted(set(controls) - set(CONTROLS))
        if unknown:
            raise InvalidArgumentError(f"controls {unknown} are not page controls; use {', '.join(CONTROLS)}.")
        overrides = {**self.given, **{name: _whole(value) for name, value in controls.items()}, **VARIANTS[variant]}
        settings = resolve_settings(preset_for(model), model=model, dtype=self.loader.dtype, **overrides)
        if settings.ensemble > MAX_ENSEMBLE:
            raise InvalidArgumentError(f"ensemble={settings.ensemble} is more than the app's {MAX_ENSEMBLE} noise "
                                       "draws; DiTF uses 8.")
        if settings.resolution is not None and settings.resolution > MAX_RESOLUTION:
            raise InvalidArgumentError(f"resolution={settings.resolution} is more than the app's {MAX_RESOLUTION} "
                                       "pixels; DiTF uses 640 for FLUX.")
        return settings

    # ------------------------------------------------------------ images
    def image(self, path: str | Path) -> LoadedImage:
        """The decoded upload at `path`, cached by (path, modification time, size)."""
        try:
            stat = Path(path).stat()
            key: Hashable | None = (str(path), stat.st_mtime_ns, stat.st_size, self.max_pixels)
        except (OSError, TypeError, ValueError):
            key = None
        cached = self._images.get(key) if key is not None else None
        if cached is not None:
            return cached
        loaded = load_upload(path, self.max_pixels)
        return self._images.put(key, loaded) if key is not None else loaded

    # ------------------------------------------------------------ models
    def featurizer(self, model: str, block: int) -> DiTFeaturizer:
        """The featurizer of `model` with at least blocks 0..`block` loaded; (re)loads only when the model
        changes or a deeper block is asked for. A failed load raises a `DitfError` naming the model."""
        with self._lock:
            if self._loaded is not None and self._loaded[0] == model and _covers(self._loaded[1], block):
                return self._featurizer
            self._featurizer, self._loaded = None, None  # free the old weights before loading new ones
            try:
                featurizer = self.loader.load(model, block)
            except DitfError:
                raise
            except Exception as err:
                raise UnknownModelError(
                    f"model {model!r} failed to load ({type(err).__name__}: {err}); give a preset alias such as "
                    "flux-dev, a hub id, or a local diffusers folder."
                ) from err
            self.counters.model_loads += 1
            self._identities.pop(model, None)  # weights read now: their identity is computed afresh
            self._featurizer, self._loaded = featurizer, (model, block)
            return featurizer

    def identity(self, model: str) -> str:
        """`model`'s identity (see `ModelLoader.identity`), computed once per load of the model."""
        if model not in self._identities:
            self._identities[model] = self.loader.identity(model)
        return self._identities[model]

    # ------------------------------------------------------------ features
    def key(self, image: LoadedImage, settings: FeatureSettings) -> Hashable:
        """(image content hash, model identity, settings without the model reference's spelling)."""
        return image.digest, self.identity(settings.model), dataclasses.replace(settings, model=None)

    def features(self, image: LoadedImage, settings: FeatureSettings) -> FeatureResult:
        """DiTF features of `image` under `settings` (`FeatureResult`: the (C, h, w) fp32 CPU map, the discarded
        channels, the settings the featurizer completed), extracted once and then kept."""
        key = self.key(image, settings)
        cached = self._features.get(key)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._features.get(key)
            if cached is not None:
                return cached
            fx = self.featurizer(settings.model, settings.block)
            result = fx.extract(image.image, settings=settings, max_batch=self.max_batch)
            self.counters.extractions += 1
            return self._features.put(key, result)

    def put_features(self, image: LoadedImage, settings: FeatureSettings, features: torch.Tensor) -> None:
        """Seed the store with a (C, h, w) map computed elsewhere (benchmarks, tests)."""
        result = FeatureResult(features.detach().float().cpu(), block=settings.block, t=settings.t, settings=settings)
        self._features.put(self.key(image, settings), result)

    def prepared_target(self, image: LoadedImage, settings: FeatureSettings) -> UpsampledTarget:
        """`prepare_target` of the image's features at its full size, kept like the features. The map is stored
        in float64 so a click skips the conversion (the matcher computes in float64 on the CPU anyway)."""
        key = self.key(image, settings)
        cached = self._targets.get(key)
        if cached is not None:
            return cached
        features = self.features(image, settings).features
        with self._lock:
            prepared = prepare_target(features.to(torch.float64), image.size)
            self.counters.preparations += 1
            return self._targets.put(key, prepared)

    @contextmanager
    def single_threaded(self) -> Iterator[None]:
        """Run the block with one torch intra-op thread and no model work alongside.

        A click multiplies a (1, C) vector by (C, h*w) matrices: too small to share between threads, and on a
        busy two-core machine the threads' hand-offs made it 5-10x slower (benchmarks/app.py)."""
        with self._lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(threads)


def _whole(value: Any) -> Any:
    """A page number: 28.0 -> 28 (the page sends floats); anything else unchanged, for the settings to check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _covers(loaded_block: int, block: int) -> bool:
    """Whether a featurizer loaded up to `loaded_block` (negative: every block) can tap `block`."""
    if loaded_block < 0:
        return True
    return 0 <= block <= loaded_block
