"""What the app does on each event, as plain functions of the page's values: no gradio needed.

Each callback takes the `FeatureStore` and the raw values of the page's components (file paths, numbers that
may arrive as floats, a click position) and returns a view dataclass with what to display and a status line.
Bad input never raises: the view carries `error=True` and a message naming the input, the value and the
fix, and the page stays usable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from ditf.app.images import LoadedImage
from ditf.app.massive_profile import MassiveProfile, massive_profile, plot_massive_profile
from ditf.app.render import heat_overlay, mark_point
from ditf.app.store import FeatureStore
from ditf.errors import DitfError, InvalidArgumentError
from ditf.matching.correspondence import cosine_map_prepared, match_prepared, upsampled_vectors
from ditf.settings import FeatureSettings

LOGGER = logging.getLogger(__name__)
Caption = tuple[np.ndarray, str]
View = TypeVar("View")


@dataclass
class ClickView:
    """The answer to a click on the source image.

    `pictures`: the source with the clicked point, then each target with its cosine heat map and predicted
    point ((H, W, 3) uint8, caption); `matches`: lines 'source: (x, y)' and 'target i: (x, y) cosine c';
    `targets`: the predicted (x, y) pixel per target; `status`: timing, cache use and settings."""

    pictures: list[Caption] | None = None
    matches: str = ""
    targets: list[tuple[int, int]] = field(default_factory=list)
    status: str = ""
    error: bool = False


@dataclass
class PcaView:
    """PCA pictures of the source and targets ((H, W, 3) uint8, caption), or an error status."""

    pictures: list[Caption] | None = None
    status: str = ""
    error: bool = False


@dataclass
class MassiveView:
    """The source's massive-activation profile, its plot (a matplotlib Figure) and a summary line."""

    profile: MassiveProfile | None = None
    figure: Any = None
    summary: str = ""
    status: str = ""
    error: bool = False


def click(store: FeatureStore, source: Any, targets: Sequence[Any] | None, point: Sequence[float] | None,
          model: str, block: Any, t: Any, ensemble: Any, resolution: Any, variant: Any = "ditf") -> ClickView:
    """Match the clicked source pixel `point` (x, y) into every target with the exact full-resolution matcher
    (`match_prepared`, the point `ditf match` prints) and draw each target's full-resolution cosine map.
    Features and prepared targets come from `store` when this image, model and settings were seen before."""

    def run() -> ClickView:
        settings = store.settings(model, variant, block=block, t=t, ensemble=ensemble, resolution=resolution)
        src = _source(store, source)
        trgs = _targets(store, targets)
        x, y = _click_position(point, src)
        start, extractions = time.perf_counter(), store.counters.extractions
        src_result = store.features(src, settings)
        prepared = [store.prepared_target(trg, settings) for trg in trgs]
        with store.single_threaded():
            vectors = upsampled_vectors(src_result.features, src.size, torch.tensor([[x, y]]))
            pictures = [(mark_point(src.image, (x, y)), f"source: ({x}, {y})")]
            lines, found = [f"source: ({x}, {y})"], []
            for index, (trg, target) in enumerate(zip(trgs, prepared), start=1):
                tx, ty = (int(v) for v in match_prepared(vectors, target)[0])
                cosine = cosine_map_prepared(vectors, target)[0]
                found.append((tx, ty))
                lines.append(f"target {index}: ({tx}, {ty}) cosine {float(cosine[ty, tx]):.4f}  [{trg.name}]")
                pictures.append((mark_point(heat_overlay(trg.image, cosine), (tx, ty)), f"target {index}: ({tx}, {ty})"))
        elapsed = time.perf_counter() - start
        ran = store.counters.extractions - extractions
        how = f"extracted {ran} feature map(s)" if ran else "cached features"
        discarded = f"; discarded channels {src_result.discarded}" if src_result.discarded else ""
        status = f"matched in {elapsed * 1000:.0f} ms ({how}; {describe(settings)}{discarded})"
        return ClickView(pictures, "\n".join(lines), found, status)

    return _guarded(run, ClickView)


def pca(store: FeatureStore, source: Any, targets: Sequence[Any] | None, model: str, block: Any, t: Any,
        ensemble: Any, resolution: Any, variant: Any = "ditf", foreground: bool = False) -> PcaView:
    """PCA pictures (`ditf.viz.pca_rgb`, fitted jointly) of the source and every target, at image size."""
    from ditf.viz import pca_rgb

    def run() -> PcaView:
        settings = store.settings(model, variant, block=block, t=t, ensemble=ensemble, resolution=resolution)
        images = [_source(store, source)] + (_targets(store, targets) if targets else [])
        maps = [store.features(image, settings).features for image in images]
        pictures = pca_rgb(maps, [image.size for image in images], foreground=bool(foreground))
        captions = ["source"] + [f"target {i}" for i in range(1, len(images))]
        return PcaView([(p, f"{c}: {im.name}") for p, c, im in zip(pictures, captions, images)],
                       f"PCA of {len(images)} image(s), fitted jointly ({describe(settings)})")

    return _guarded(run, PcaView)


def massive(store: FeatureStore, source: Any, model: str, block: Any, t: Any, ensemble: Any,
            resolution: Any) -> MassiveView:
    """Per-channel median |z| of the source's raw block input (the `raw` variant's map, from the same store),
    the massive channels of the ratio rule at the settings' `massive_ratio` marked."""

    def run() -> MassiveView:
        settings = store.settings(model, "raw", block=block, t=t, ensemble=ensemble, resolution=resolution)
        src = _source(store, source)
        profile = massive_profile(store.features(src, settings).features, settings.massive_ratio)
        title = f"{src.name}: raw input of block {settings.block} at t={settings.t:g}; red: massive channels"
        return MassiveView(profile, plot_massive_profile(profile, title), profile.summary(),
                           f"{len(profile.median_abs)} channels ({describe(settings)})")

    return _guarded(run, MassiveView)


def describe(settings: FeatureSettings) -> str:
    """One line for captions: 'block 28, t=261, ensemble 2, 256 px, ditf'."""
    size = f"{settings.resolution} px" if settings.resolution is not None else f"{settings.size} px"
    return f"block {settings.block}, t={settings.t:g}, ensemble {settings.ensemble}, {size}, {settings.variant}"


def _guarded(run: Callable[[], View], view: Callable[..., View]) -> View:
    try:
        return run()
    except DitfError as err:
        return view(status=f"error: {err}", error=True)
    except Exception as err:  # keep the page alive; the traceback goes to the server log
        LOGGER.exception("app callback failed")
        return view(status=f"error: unexpected {type(err).__name__}: {err} (see the server log)", error=True)


def _path_of(item: Any) -> Any:
    """A gallery item is (path, caption); a plain upload is the path itself."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _source(store: FeatureStore, source: Any) -> LoadedImage:
    if source is None or source == "":
        raise InvalidArgumentError("no source image; upload one (or load the example images) first.")
    return store.image(_path_of(source))


def _targets(store: FeatureStore, targets: Sequence[Any] | None) -> list[LoadedImage]:
    if not targets:
        raise InvalidArgumentError("no target image; upload one or more target images (or load the example images).")
    return [store.image(_path_of(item)) for item in targets]


def _click_position(point: Sequence[float] | None, image: LoadedImage) -> tuple[int, int]:
    height, width = image.size
    if point is None or len(point) != 2 or any(v is None for v in point):
        raise InvalidArgumentError(f"the click {point!r} is not on the source image; click inside the picture.")
    x, y = (int(round(float(v))) for v in point)
    if not (0 <= x < width and 0 <= y < height):
        raise InvalidArgumentError(
            f"the click ({x}, {y}) lies outside the source image ({width}x{height} pixels); click inside the picture."
        )
    return x, y
