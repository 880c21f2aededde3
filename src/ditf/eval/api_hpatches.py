"""Library-first HPatches: `evaluate_hpatches(root, ...)` returns the dict `ditf eval hpatches` writes.

    from ditf.eval import DiTFExtractor, evaluate_hpatches
    results = evaluate_hpatches("hpatches-sequences-release", extractor=DiTFExtractor("flux-dev", task="hpatches"),
                                keypoints="superpoint-1k/")
    results = evaluate_hpatches("hpatches-sequences-release", features="feats/", keypoints="sift", mode="ransac")

Features come from `features` (maps `DIR/<sequence>/<k>.safetensors`) or `extractor`, through the content-
addressed feature cache; the protocol is DIFT's (`ditf.eval.hpatches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditf.eval.api import feature_source, settings_sources
from ditf.eval.extractors import DiTFExtractor
from ditf.eval.hpatches import HPatchesFeatures, hpatches_images, load_hpatches, score_hpatches
from ditf.eval.hpatches_keypoints import check_keypoint_files
from ditf.eval.hpatches_protocol import DEFAULT_THRESHOLDS, HOMOGRAPHY_MODES, REPROJECTION_THRESHOLD
from ditf.eval.scoring import ensure_features
from ditf.eval.sharding import extract_shard_of
from ditf.eval.sources import Extractor, FeatureFolder
from ditf.errors import InvalidArgumentError
from ditf.versions import ditf_version


def evaluate_hpatches(root: str | Path, *, features: str | Path | None = None,
                      extractor: Extractor | str | None = None, keypoints: str | Path = "sift", mode: str = "lmeds",
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                      reprojection_threshold: float = REPROJECTION_THRESHOLD, sequences: Sequence[str] | None = None,
                      require_all: bool = False, cache_dir: str | Path | None = None, cache_only: bool = False,
                      cache_dtype: str | None = None, shard: str | tuple[int, int] | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """HPatches homography estimation with DIFT's protocol: the results dict `ditf eval hpatches` writes.

    Args:
        root: the hpatches-sequences-release folder (or its parent).
        features: a folder of maps `<sequence>/<k>.safetensors` (tensor `features`, (C, h, w), covering the whole
            image); or
        extractor: an `Extractor` (a `DiTFExtractor` built with task="hpatches" extracts at DIFT's 768x768
            square resize; a model reference is resolved that way), behind the feature cache (`cache_dir`,
            `cache_only`, `cache_dtype` as in `ditf.eval.feature_source`).
        keypoints: a folder of `<sequence>-<k>.kp` files (`x y` pixel rows; DIFT: SuperPoint, 1k per image), or a
            built-in detector "sift" / "grid" (not comparable to DIFT's numbers). Files are read before any model
            loads.
        mode: "lmeds" (DIFT's default) or "ransac"; thresholds: corner errors in pixels (1, 3, 5);
            reprojection_threshold: RANSAC's, in pixels.
        sequences, require_all: which sequences (default: all present except the 8 high-resolution ones; a
            subset warns that scores are not comparable); require_all insists on the standard 108.
        shard: "i/n" or "auto": only fill the feature cache for that share of the images and return its summary.

    Returns:
        {"overall", "i", "v": percent of pairs within each threshold (None for a group without pairs),
        "thresholds": px, "per_pair": {"<sequence>/<k>": {"mean_corner_error": px or None, "matches": int}},
        "benchmark", "protocol" (the card), "settings" (the feature source), "ditf_version"}.
    """
    if mode not in HOMOGRAPHY_MODES:
        raise InvalidArgumentError(f"mode={mode!r} is not one of {', '.join(HOMOGRAPHY_MODES)} (DIFT's LMEDS default, "
                                   "or RANSAC).")
    dataset = load_hpatches(root, sequences, require_all=require_all)
    check_keypoint_files(keypoints, [image for sequence in dataset.sequences for image in sequence.images])
    if isinstance(extractor, str):
        extractor = DiTFExtractor(extractor, task="hpatches")
    if features is not None:
        source = FeatureFolder(features, group="sequence", flat=False)
        given = [name for name, value in (("cache_dir", cache_dir), ("cache_only", cache_only),
                                          ("cache_dtype", cache_dtype), ("shard", shard)) if value]
        if extractor is not None or given:
            raise InvalidArgumentError(f"features={str(features)!r} reads precomputed maps; "
                                       f"{'extractor=' if extractor is not None else ', '.join(given)} only apply "
                                       "to an extractor: pass one of them.")
    else:
        source = feature_source(extractor=extractor, cache_dir=cache_dir, cache_only=cache_only,
                                cache_dtype=cache_dtype)
    images = hpatches_images(dataset)
    if shard is not None:
        return extract_shard_of(images, source, shard, progress)
    ensure_features(images, source, progress)
    results = score_hpatches(dataset, HPatchesFeatures(source, images), keypoints=keypoints, mode=mode,
                             thresholds=thresholds, reprojection_threshold=reprojection_threshold, progress=progress)
    results["settings"] = source.describe()
    results["ditf_version"] = ditf_version()
    return {**results, **settings_sources(extractor)}
