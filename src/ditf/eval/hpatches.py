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
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.homography import (
    DEFAULT_THRESHOLDS,
    HOMOGRAPHY_METHODS,
    estimate_homography,
    homography_accuracy,
    mean_corner_error,
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
from ditf.eval.hpatches_keypoints import describe_keypoints, keypoints_for, read_keypoints

__all__ = [
    "STANDARD_SEQUENCES",
    "FeaturesFor",
    "HPatchesDataset",
    "HPatchesFeatureFolder",
    "HPatchesSubsetWarning",
    "evaluate_hpatches",
    "hpatches_feature_folder",
    "hpatches_protocol_card",
    "keypoints_for",
    "load_hpatches",
    "read_keypoints",
]

FeaturesFor = Callable[[str, int, Path], torch.Tensor]
DIFT_REFERENCE = "DIFT eval_hpatches.py + eval_homography.py (Tsingularity/dift @9421eb2)"
FEATURES_TENSOR = "features"


class HPatchesFeatureFolder:
    """Precomputed maps `root/<sequence>/<k>.safetensors`, tensor `features` (C, h, w) covering the
    whole image k; callable as `features_for(sequence, k, image_path)`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"features folder {self.root} does not exist; pass the folder that holds "
                f"<sequence>/<k>.safetensors files (tensor '{FEATURES_TENSOR}', shape (C, h, w))"
            )

    def path_for(self, sequence: str, index: int) -> Path:
        """The file expected to hold the map of image `index` of `sequence`."""
        return self.root / sequence / f"{index}.safetensors"

    def __call__(self, sequence: str, index: int, image_path: Path) -> torch.Tensor:
        path = self.path_for(sequence, index)
        if not path.is_file():
            raise DatasetError(
                f"no features for {image_path}: {path} does not exist; write the map of that image there as a "
                f"safetensors file with a tensor '{FEATURES_TENSOR}' of shape (C, h, w)"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                if FEATURES_TENSOR not in handle.keys():
                    raise DatasetError(
                        f"{path} holds tensors {list(handle.keys())} but no '{FEATURES_TENSOR}'; rename the feature tensor"
                    )
                return handle.get_tensor(FEATURES_TENSOR)
        except SafetensorError as err:
            raise DatasetError(f"{path} is not a readable safetensors file ({err}); rewrite it") from err

    def describe(self) -> dict:
        """Settings entry for the results JSON."""
        return {"source": "features folder", "features": str(self.root)}


def hpatches_feature_folder(root: str | Path) -> HPatchesFeatureFolder:
    """A `features_for` that reads `root/<sequence>/<k>.safetensors` (tensor `features`, (C, h, w))."""
    return HPatchesFeatureFolder(root)


def hpatches_protocol_card(
    keypoints: str | Path = "sift",
    mode: str = "lmeds",
    reprojection_threshold: float = 3.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict:
    """The protocol card: a plain-language statement of every choice, printed with results."""
    method = {"lmeds": "cv2.LMEDS (ignores the reprojection threshold)", "ransac": "cv2.RANSAC"}.get(mode, mode)
    return {
        "name": "dift-hpatches",
        "reference": DIFT_REFERENCE,
        "mode": mode,
        "reprojection_threshold": float(reprojection_threshold),
        "thresholds": [float(threshold) for threshold in thresholds],
        "keypoints": str(keypoints),
        "description": {
            "pairs": "image 1 with each image k = 2..6 of every sequence; i_* and v_* scored apart and together",
            "keypoints": describe_keypoints(keypoints) + "; duplicates dropped with np.unique(axis=0), "
            "which sorts them by x then y",
            "descriptors": "F.grid_sample (bilinear, zero padding, align_corners=False) of each image's own (C, h, w) "
            "map at (kp - c) / c, c = ((W - 1) / 2, (H - 1) / 2) of that image; the map is not upsampled and "
            "covers the whole image",
            "matching": "mutual nearest neighbours by cosine similarity (first index wins a tie)",
            "homography": f"cv2.findHomography(image-1 points, image-k points, {method}, "
            f"ransacReprojThreshold={reprojection_threshold:g}) on float32 pixels",
            "error": "mean distance (px) between image 1's corners (0,0), (0,H-1), (W-1,0), (W-1,H-1) warped by the "
            "estimate and by H_1_k",
            "accuracy": "percent of pairs with mean corner error <= each threshold (px)",
            "failures": "fewer than 4 matches, or no homography from OpenCV: mean_corner_error null, wrong at every "
            "threshold (DIFT's script has no branch for this and stops with an error)",
        },
    }


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


def evaluate_hpatches(
    dataset: HPatchesDataset,
    features_for: FeaturesFor,
    *,
    keypoints: str | Path = "sift",
    mode: str = "lmeds",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    reprojection_threshold: float = 3.0,
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
    if mode not in HOMOGRAPHY_METHODS:
        raise InvalidArgumentError(f"mode must be one of {tuple(HOMOGRAPHY_METHODS)}, got {mode!r}")
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
