"""The HPatches homography protocol of DIFT (Tsingularity/dift @9421eb2): its choices, and the card that states them.

Imports neither torch nor OpenCV, so the command line can offer the choices before anything loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ditf.eval.hpatches_keypoints import describe_keypoints

HOMOGRAPHY_MODES = ("lmeds", "ransac")
"""cv2.findHomography methods of DIFT's eval_homography.py: LMEDS (its default) and RANSAC."""
DEFAULT_THRESHOLDS = (1.0, 3.0, 5.0)
"""Corner-error thresholds in pixels (DIFT: np.linspace(1, 5, 3))."""
REPROJECTION_THRESHOLD = 3.0
"""ransacReprojThreshold of DIFT's cv2.findHomography call, in pixels (LMEDS ignores it)."""
DIFT_REFERENCE = "DIFT eval_hpatches.py + eval_homography.py (Tsingularity/dift @9421eb2)"


def hpatches_protocol_card(
    keypoints: str | Path = "sift",
    mode: str = "lmeds",
    reprojection_threshold: float = REPROJECTION_THRESHOLD,
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
