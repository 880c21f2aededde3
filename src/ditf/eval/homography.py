"""The maths of DIFT's HPatches homography protocol, as small pure functions.

Reference: Tsingularity/dift `eval_hpatches.py` (descriptor sampling) and `eval_homography.py`
(matching, homography, corner error, accuracy), commit 9421eb2. Each function states which line of
theirs it mirrors. Coordinates are (x, y) pixels of the original image; sizes are (H, W).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError
from ditf.eval.hpatches_protocol import DEFAULT_THRESHOLDS, REPROJECTION_THRESHOLD

HOMOGRAPHY_METHODS = {"lmeds": cv2.LMEDS, "ransac": cv2.RANSAC}
MIN_MATCHES = 4  # a homography has 8 degrees of freedom; cv2.findHomography refuses fewer points


def _check_keypoints(keypoints: np.ndarray, name: str) -> np.ndarray:
    keypoints = np.asarray(keypoints)
    if keypoints.ndim != 2 or keypoints.shape[1] != 2:
        raise InvalidArgumentError(f"{name} must be an (N, 2) array of (x, y) pixels, got shape {keypoints.shape}")
    return keypoints


def sample_descriptors(features: torch.Tensor, keypoints: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """(N, C) float32 descriptors: `features` (C, h, w) bilinearly sampled at `keypoints` (N, 2) (x, y)
    pixels of an image of `image_size` (H, W).

    Exactly DIFT's `F.grid_sample(feat, (kp - c) / c)` with c = ((W - 1) / 2, (H - 1) / 2) in float32
    and grid_sample's defaults (bilinear, zero padding, align_corners=False). So pixel 0 and pixel
    W - 1 land on the outer *edges* of the map (not on the centres of its corner cells), and the map
    must cover the whole image at any resolution: DIFT never upsamples it.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidArgumentError(f"features must be a (C, h, w) tensor, got {shape}")
    keypoints = _check_keypoints(keypoints, "keypoints")
    height, width = image_size
    if height < 2 or width < 2:
        raise InvalidArgumentError(f"image_size (H, W) must be at least (2, 2), got {image_size}")
    coords = torch.from_numpy(np.ascontiguousarray(keypoints, dtype=np.float32))
    centre = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0], dtype=torch.float32)
    grid = ((coords - centre) / centre).view(1, len(coords), 1, 2)
    sampled = F.grid_sample(features.detach().float().cpu()[None], grid, align_corners=False)  # (1, C, N, 1)
    return sampled[0, :, :, 0].t().contiguous()


def mutual_nearest_neighbours(descriptors_a: torch.Tensor, descriptors_b: torch.Tensor) -> np.ndarray:
    """(M, 2) int64 index pairs (i into a, j into b) such that b[j] is a[i]'s most cosine-similar
    descriptor and a[i] is b[j]'s. Rows are ordered by i.

    DIFT's `mnn_matcher(metric='cosine')`: L2-normalise (F.normalize), similarity a @ b.T, argmax by
    `torch.max` (the first index wins a tie). An all-zero descriptor has similarity 0 to everything.
    """
    if descriptors_a.ndim != 2 or descriptors_b.ndim != 2 or descriptors_a.shape[1] != descriptors_b.shape[1]:
        raise InvalidArgumentError(
            f"descriptors must be (N, C) and (M, C) with the same C, got {tuple(descriptors_a.shape)} and "
            f"{tuple(descriptors_b.shape)}"
        )
    if len(descriptors_a) == 0 or len(descriptors_b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    similarity = F.normalize(descriptors_a.float()) @ F.normalize(descriptors_b.float()).t()
    nearest_in_b = torch.max(similarity, dim=1)[1]
    nearest_in_a = torch.max(similarity, dim=0)[1]
    ids_a = torch.arange(similarity.shape[0])
    mutual = ids_a == nearest_in_a[nearest_in_b]
    return torch.stack([ids_a[mutual], nearest_in_b[mutual]], dim=1).numpy().astype(np.int64)


def estimate_homography(
    points_a: np.ndarray, points_b: np.ndarray, method: str = "lmeds", threshold: float = REPROJECTION_THRESHOLD
) -> np.ndarray | None:
    """The (3, 3) float64 homography mapping `points_a` (M, 2) onto `points_b` (M, 2), pixels, or None.

    DIFT's `cv2.findHomography(pts_a, pts_b, cv2.LMEDS or cv2.RANSAC, ransacReprojThreshold=3)` on
    float32 points (`threshold` is the reprojection threshold in pixels; LMEDS ignores it). None when
    there are fewer than 4 matches (OpenCV raises) or OpenCV finds no homography (it returns None):
    DIFT has no branch for either and crashes there; `score_hpatches` counts such a pair as wrong
    at every threshold.
    """
    if method not in HOMOGRAPHY_METHODS:
        raise InvalidArgumentError(f"homography method must be one of {tuple(HOMOGRAPHY_METHODS)}, got {method!r}")
    points_a = _check_keypoints(points_a, "points_a")
    points_b = _check_keypoints(points_b, "points_b")
    if len(points_a) != len(points_b):
        raise InvalidArgumentError(
            f"points_a and points_b must pair up row by row, got {len(points_a)} and {len(points_b)} rows"
        )
    if len(points_a) < MIN_MATCHES:
        return None
    homography, _ = cv2.findHomography(
        points_a.reshape(-1, 1, 2).astype(np.float32),
        points_b.reshape(-1, 1, 2).astype(np.float32),
        HOMOGRAPHY_METHODS[method],
        ransacReprojThreshold=threshold,
    )
    return homography


def image_corners(image_size: tuple[int, int]) -> np.ndarray:
    """(4, 2) pixel corners (0, 0), (0, H-1), (W-1, 0), (W-1, H-1) of an image of size (H, W), as
    (x, y) in DIFT's order."""
    height, width = image_size
    return np.array([[0, 0], [0, height - 1], [width - 1, 0], [width - 1, height - 1]], dtype=np.float64)


def warp_points(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) (x, y) points mapped by a (3, 3) homography (dehomogenised), float64."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.transpose(homography)
    with np.errstate(divide="ignore", invalid="ignore"):  # a point sent to infinity stays inf / nan
        return homogeneous[:, :2] / homogeneous[:, 2:]


def mean_corner_error(estimate: np.ndarray, truth: np.ndarray, image_size: tuple[int, int]) -> float:
    """Mean Euclidean distance (pixels) between the four corners of the reference image of size
    (H, W) warped by the (3, 3) `estimate` and by the (3, 3) `truth`. DIFT uses image 1's size."""
    corners = image_corners(image_size)
    distances = np.linalg.norm(warp_points(truth, corners) - warp_points(estimate, corners), axis=1)
    return float(np.mean(distances))


def homography_accuracy(
    errors: Mapping[str, float | None], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict:
    """Percent of pairs whose mean corner error is <= each threshold (pixels).

    `errors` maps pair names "<sequence>/<k>" to the mean corner error, or None for a pair without a
    homography (wrong at every threshold). Sequences named `i_*` (illumination) and `v_*`
    (viewpoint) are scored apart and together, as DIFT does. Returns {"overall", "i", "v":
    [percent per threshold] (None for a group without pairs), "thresholds": [...]}.
    """
    limits = np.asarray(thresholds, dtype=np.float64)
    correct: dict[str, list[np.ndarray]] = {"i": [], "v": []}
    for name, error in errors.items():
        kind = name[:1]
        if kind not in correct or name[1:2] != "_":
            raise InvalidArgumentError(
                f"pair {name!r} belongs to no i_* or v_* HPatches sequence; name pairs '<sequence>/<k>'"
            )
        correct[kind].append(np.zeros(len(limits), dtype=bool) if error is None else error <= limits)

    def percent(rows: list[np.ndarray]) -> list[float] | None:
        return (np.mean(np.array(rows), axis=0) * 100).tolist() if rows else None

    return {
        "overall": percent(correct["i"] + correct["v"]),
        "i": percent(correct["i"]),
        "v": percent(correct["v"]),
        "thresholds": limits.tolist(),
    }
