"""HPatches homography estimation, DIFT's protocol exactly (Tsingularity/dift `eval_hpatches.py` +
`eval_homography.py` @9421eb2).

For each sequence, image 1 is matched with images 2..6: keypoints per image (DIFT's SuperPoint-1k
files, or built-in SIFT / grid), made unique; descriptors bilinearly sampled from each image's
feature map; mutual nearest neighbours by cosine; `cv2.findHomography` (LMEDS by default, or RANSAC;
reprojection threshold 3 px); error = mean distance of image 1's four corners warped by the estimate
and by the ground truth; accuracy = percent of pairs within 1, 3 and 5 px, over all sequences, `i_*`
and `v_*`. The maths lives in `ditf.eval.homography`, the loader in `ditf.eval.hpatches_dataset`.

Features: `features_for(sequence, k, image_path)` returns a (C, h, w) map covering the whole of
image k, at any resolution: keypoints are normalised by the image's own size, so neither the map's
size nor its aspect ratio has to match the image. DIFT extracts every HPatches image resized to
768x768 (PIL `Image.resize`, aspect not kept) and samples the raw low-resolution map: SD-2.1 at
t=0, up_ft_index 2 (640 x 96 x 96), ensemble 8, empty prompt; ADM at t=41, up_ft_index 11,
ensemble 4. A `--model` run therefore extracts each whole image once (no crop, no padding) and
hands the map over unchanged; `hpatches_feature_folder` reads maps saved as
`DIR/<sequence>/<k>.safetensors` (tensor `features`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.homography import (
    homography_accuracy,
    mean_corner_error,
    estimate_homography,
    mutual_nearest_neighbours,
    sample_descriptors,
)
from ditf.eval.hpatches_dataset import (
    STANDARD_SEQUENCES,
    HPatchesDataset,
    HPatchesImage,
    HPatchesSubsetWarning,
    load_hpatches,
)
from ditf.eval.hpatches_keypoints import keypoints_for, read_keypoints
from ditf.eval.hpatches_protocol import (
    DEFAULT_THRESHOLDS,
    HOMOGRAPHY_MODES,
    REPROJECTION_THRESHOLD,
    hpatches_protocol_card,
)
from ditf.eval.keypoints import ImageRecord, image_size
from ditf.eval.sources import FeatureFolder, FeatureSource

__all__ = [
    "STANDARD_SEQUENCES",
    "FeaturesFor",
    "HPatchesDataset",
    "HPatchesFeatures",
    "HPatchesSubsetWarning",
    "hpatches_feature_folder",
    "hpatches_images",
    "hpatches_protocol_card",
    "keypoints_for",
    "load_hpatches",
    "plot_homography_accuracy",
    "read_keypoints",
    "score_hpatches",
]

FeaturesFor = Callable[[str, int, Path], torch.Tensor]
"""features_for(sequence, k, image_path) -> (C, h, w) map covering the whole of image k of the sequence."""


def hpatches_images(dataset: HPatchesDataset) -> list[ImageRecord]:
    """Every image of `dataset` as an `ImageRecord` grouped by sequence, so feature folders hold them as
    `<folder>/<sequence>/<k>.safetensors` and the feature cache keys them by content."""
    return [ImageRecord(image.path, image.sequence, image.size)
            for sequence in dataset.sequences for image in sequence.images]


class HPatchesFeatures:
    """A `features_for(sequence, k, image_path)` over any feature source (a folder `<sequence>/<k>.safetensors`
    or a cached extractor); `path_for(sequence, k)` names the file in errors. `images` (from `hpatches_images`)
    saves reading each image's size again."""

    def __init__(self, source: FeatureSource, images: Sequence[ImageRecord] = ()):
        self.source = source
        self._records = {(image.group, int(image.stem)): image for image in images}

    def _record(self, sequence: str, index: int, image_path: Path) -> ImageRecord:
        if (sequence, index) not in self._records:
            self._records[sequence, index] = ImageRecord(Path(image_path), sequence, image_size(Path(image_path)))
        return self._records[sequence, index]

    def path_for(self, sequence: str, index: int) -> Path:
        """The feature file of image `index` of `sequence` (for a folder: `<folder>/<sequence>/<index>.safetensors`)."""
        record = self._records.get((sequence, index))
        if record is None:
            return Path(f"{sequence}/{index}.safetensors")
        return self.source.path_for(record)

    def __call__(self, sequence: str, index: int, image_path: Path) -> torch.Tensor:
        return self.source.load(self._record(sequence, index, image_path))

    def describe(self) -> dict:
        """Settings entry for the results JSON: the source's."""
        return self.source.describe()


def hpatches_feature_folder(root: str | Path) -> HPatchesFeatures:
    """A `features_for` that reads `root/<sequence>/<k>.safetensors` (tensor `features`, (C, h, w))."""
    return HPatchesFeatures(FeatureFolder(root, group="sequence", flat=False))


def _where(features_for: FeaturesFor, image: HPatchesImage) -> str:
    path_for = getattr(features_for, "path_for", None)
    return str(path_for(image.sequence, image.index)) if callable(path_for) else f"features of {image.path}"


def _checked_features(features: object, where: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise DatasetError(f"{where}: expected a (C, h, w) tensor, got {type(features).__name__}")
    if features.ndim != 3 or min(features.shape) < 1:
        raise DatasetError(
            f"{where}: feature map has shape {tuple(features.shape)}; expected (C, h, w) with no batch axis "
            "(save features[0] for a batch of one)"
        )
    if not features.is_floating_point():
        raise DatasetError(f"{where}: feature map has dtype {features.dtype}; cast it to a floating-point type")
    return features


def _describe_image(
    image: HPatchesImage, features_for: FeaturesFor, keypoints: str | Path
) -> tuple[np.ndarray, torch.Tensor]:
    points = np.unique(keypoints_for(keypoints, image), axis=0)
    features = _checked_features(features_for(image.sequence, image.index, image.path), _where(features_for, image))
    return points, sample_descriptors(features, points, image.size)


def score_hpatches(
    dataset: HPatchesDataset,
    features_for: FeaturesFor,
    *,
    keypoints: str | Path = "sift",
    mode: str = "lmeds",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    reprojection_threshold: float = REPROJECTION_THRESHOLD,
    progress: bool = True,
) -> dict:
    """Homography accuracy of the feature maps from `features_for` on `dataset`, DIFT's protocol.

    `features_for(sequence, k, image_path)` returns image k's (C, h, w) map covering the whole image.
    `keypoints` is a folder of `<sequence>-<k>.kp` files or a built-in detector ("sift", "grid").
    `mode` is "lmeds" (DIFT's default) or "ransac"; `thresholds` are corner errors in pixels.

    Returns {"overall", "i", "v": [percent per threshold], "thresholds": [px], "per_pair":
    {"<sequence>/<k>": {"mean_corner_error": px or None, "matches": int}}, "benchmark": {...},
    "protocol": card}. A pair whose two maps differ in channels raises DatasetError naming both.
    """
    card = hpatches_protocol_card(keypoints, mode, reprojection_threshold, thresholds)
    if mode not in HOMOGRAPHY_MODES:
        raise InvalidArgumentError(f"mode must be one of {HOMOGRAPHY_MODES}, got {mode!r}")
    errors: dict[str, float | None] = {}
    per_pair: dict[str, dict] = {}
    for sequence in tqdm(dataset.sequences, desc="HPatches", unit="sequence", disable=not progress):
        reference_points, reference_descriptors = _describe_image(sequence.images[0], features_for, keypoints)
        for pair in sequence.pairs:
            target_points, target_descriptors = _describe_image(pair.target, features_for, keypoints)
            if target_descriptors.shape[1] != reference_descriptors.shape[1]:
                raise DatasetError(
                    f"{_where(features_for, pair.reference)}: {reference_descriptors.shape[1]} channels, but "
                    f"{_where(features_for, pair.target)}: {target_descriptors.shape[1]}; both images of a pair "
                    "must be described by the same model and layer: re-extract the features of that sequence"
                )
            matches = mutual_nearest_neighbours(reference_descriptors, target_descriptors)
            estimate = estimate_homography(
                reference_points[matches[:, 0]], target_points[matches[:, 1]], mode, reprojection_threshold
            )
            error = None if estimate is None else mean_corner_error(estimate, pair.homography, pair.reference.size)
            errors[pair.name] = error if error is not None and np.isfinite(error) else None
            per_pair[pair.name] = {"mean_corner_error": errors[pair.name], "matches": int(len(matches))}
    return {
        "benchmark": dataset.describe(),
        "protocol": card,
        **homography_accuracy(errors, thresholds),
        "per_pair": per_pair,
    }


def plot_homography_accuracy(results: dict, path: str | Path) -> Path:
    """Line chart of homography accuracy (percent of pairs) against the corner-error threshold (px), for all
    sequences, `i_*` and `v_*`; saved atomically (format from the suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ditf.io import atomic_path

    figure = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for group, label, style in (("overall", "all", "-o"), ("i", "illumination (i_*)", "--s"),
                                ("v", "viewpoint (v_*)", ":^")):
        if results.get(group) is not None:
            axes.plot(results["thresholds"], results[group], style, label=label)
    axes.set_xlabel("mean corner error threshold (px)")
    axes.set_ylabel("pairs within the threshold (%)")
    axes.set_ylim(0, 100)
    card = results["protocol"]
    axes.set_title(f"HPatches homography accuracy ({card['mode']}, {results['benchmark']['pairs']} pairs)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or "png")
    return path
