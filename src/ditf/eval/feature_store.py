"""The feature maps of one scoring run: read once, checked, kept while recent; fused per pair with DINOv2.

`ScoringFeatures` serves each image's (C, h, w) map of one source and its target prepared for the exact
matcher; `FusedScoringFeatures` serves, for each pair, the fused maps of `ditf.features.fusion` computed from
the DiTF and the DINOv2 `ScoringFeatures` (the PCA is fitted on the pair, so fused maps exist per pair, never
per image). Both give `pair_features(pair) -> (source map, target map)` and `prepared_target(pair, target
map)`. (Not `ditf.app.store.FeatureStore`, the app's store of extracted features.)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ditf.errors import DatasetError
from ditf.eval.keypoints import ImageRecord, KeypointPair
from ditf.eval.protocol import Protocol
from ditf.eval.sources import FeatureSource
from ditf.features.fusion import fuse_pair
from ditf.features.fusion_settings import FusionSettings
from ditf.matching.correspondence import prepare_target

FEATURE_LRU_IMAGES = 32
"""Feature maps (and prepared targets) kept in memory while scoring."""
SANITY_CHECKS = ("constant", "aspect")
"""Checks of every feature map before it is scored, which `allow` can switch off: a constant map (an extractor
that failed silently) and a map whose orientation disagrees with its image's (a transposed map)."""
ASPECT_SLACK = 1.1
"""A map and its image disagree in orientation when one is more than 10% taller than wide and the other more
than 10% wider than tall (square maps of square-resizing extractors, e.g. DIFT, pass)."""


def check_map(features: torch.Tensor, size: tuple[int, int], where: str, allow: Collection[str] = ()) -> None:
    """DatasetError naming `where` when `features` (C, h, w) of an image of `size` (H, W) is constant, or lies in
    the other orientation (transposed), unless `allow` names that check."""
    if "constant" not in allow and bool(features.amax() == features.amin()):
        raise DatasetError(f"{where}: the feature map is constant (every value {float(features.flatten()[0]):g}); the "
                           "extractor probably failed. Recompute it, or score it anyway with --allow constant.")
    map_aspect, image_aspect = features.shape[1] / features.shape[2], size[0] / size[1]
    flipped = (map_aspect > ASPECT_SLACK and image_aspect < 1 / ASPECT_SLACK) or (
        map_aspect < 1 / ASPECT_SLACK and image_aspect > ASPECT_SLACK)
    if "aspect" not in allow and flipped:
        raise DatasetError(
            f"{where}: the feature map is {features.shape[1]}x{features.shape[2]} (h x w) but its image is "
            f"{size[0]}x{size[1]} (H x W): the map is transposed, or belongs to another image. Save maps as (C, h, w), "
            "or score anyway with --allow aspect."
        )


def check_pair_channels(pair: KeypointPair, source: torch.Tensor, target: torch.Tensor, where: Callable[[ImageRecord], str],
                        what: str = "features") -> None:
    """DatasetError naming both maps when the source and target maps of `pair` differ in channels."""
    if source.shape[0] != target.shape[0]:
        raise DatasetError(
            f"pair {pair.name}: the {what} of the source ({where(pair.source)}) have {source.shape[0]} channels but "
            f"those of the target ({where(pair.target)}) have {target.shape[0]}; extract every image with the same "
            "model and settings (delete the odd file, or the cache entry, and extract it again)."
        )


class ScoringFeatures:
    """Loads, checks and keeps the most recently used feature maps and prepared targets of one scoring run.

    `load(image) -> (C, h, w)`; `where(image)` names the map's file in errors; targets are prepared for the
    exact matcher on `device`; `allow` switches off `SANITY_CHECKS`.
    """

    def __init__(self, load: Callable[[ImageRecord], torch.Tensor], protocol: Protocol,
                 device: torch.device | str = "cpu", capacity: int = FEATURE_LRU_IMAGES,
                 where: Callable[[ImageRecord], str] | None = None, allow: Collection[str] = ()):
        self._load = load
        self.where = where or (lambda image: f"features of {image.key}")
        self.allow = tuple(allow)
        self.protocol = protocol
        self.device = torch.device(device)
        self.features = lru_cache(maxsize=capacity)(self._features)
        self.target = lru_cache(maxsize=capacity)(self._target)

    def _features(self, image: ImageRecord) -> torch.Tensor:
        features = self._load(image)
        if self.protocol.frame == "square_pad" and features.shape[1] != features.shape[2]:
            raise DatasetError(
                f"features of {image.path.name} are {features.shape[1]}x{features.shape[2]} (h x w) but "
                "--protocol geoaware needs maps of the zero-padded square image (h == w); extract them "
                "from the padded image or use --protocol ditf"
            )
        check_map(features, self.protocol.frame_for(image).size, self.where(image), self.allow)
        return features

    def _target(self, image: ImageRecord) -> object:
        return prepare_target(self.features(image), self.protocol.frame_for(image).size, device=self.device)

    def pair_features(self, pair: KeypointPair) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, h, w) maps of `pair`'s source and target, checked to have the same channels."""
        source, target = self.features(pair.source), self.features(pair.target)
        check_pair_channels(pair, source, target, self.where)
        return source, target

    def prepared_target(self, pair: KeypointPair, target: torch.Tensor) -> object:
        """`pair`'s target map prepared for the exact matcher (kept for the next pair with that target)."""
        return self.target(pair.target)


@dataclass(frozen=True)
class Fusion:
    """DINOv2 features to fuse with the scored features: their `source` (cached extractor or folder) and the
    `settings` of `ditf.features.fusion`."""

    source: FeatureSource
    settings: FusionSettings

    def describe(self) -> dict[str, Any]:
        """Settings entry for the results JSON: the fusion parameters and the DINOv2 source."""
        return {**self.settings.to_dict(), "dino": self.source.describe()}


class FusedScoringFeatures:
    """Fused maps per pair from a DiTF `ScoringFeatures` and a DINOv2 `ScoringFeatures` (each map read once and
    kept while recent); targets are prepared per pair, since a target's fused map depends on its source."""

    def __init__(self, ditf: ScoringFeatures, dino: ScoringFeatures, settings: FusionSettings):
        self.ditf, self.dino, self.settings = ditf, dino, settings
        self.protocol, self.device = ditf.protocol, ditf.device

    def pair_features(self, pair: KeypointPair) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused (D, h, w) maps of `pair`'s source and target, on the matcher's device."""
        ditf_src, ditf_trg = self.ditf.pair_features(pair)
        dino_src, dino_trg = self.dino.pair_features(pair)
        return fuse_pair(self.settings, ditf_src.to(self.device), ditf_trg.to(self.device),
                         dino_src.to(self.device), dino_trg.to(self.device))

    def prepared_target(self, pair: KeypointPair, target: torch.Tensor) -> object:
        """`target` (the pair's fused target map) prepared for the exact matcher."""
        return prepare_target(target, self.protocol.frame_for(pair.target).size, device=self.device)
