"""Keypoints for the HPatches protocol: DIFT's released files, or a built-in detector.

DIFT evaluates at 1k SuperPoint keypoints per image, released as `<sequence>-<k>.kp` text files
(one `x y` row per keypoint, pixels). Without them, two built-in sources need nothing extra:
`"sift"` (OpenCV SIFT, the SIFT_MAX_KEYPOINTS strongest) and `"grid"` (a regular grid every
GRID_SPACING pixels). Scores from built-in keypoints are not comparable to DIFT's SuperPoint numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.hpatches_dataset import HPatchesImage

SUPERPOINT_1K_URL = (
    "https://www.dropbox.com/scl/fi/1mxy3oycnz7m2acd92u2x/superpoint-1k.zip?rlkey=fic30gr2tlth3cmsyyywcg385&dl=1"
)
KEYPOINT_DETECTORS = ("sift", "grid")
SIFT_MAX_KEYPOINTS = 1000  # as many as DIFT's SuperPoint files hold
GRID_SPACING = 8  # pixels between grid keypoints; the first sits at spacing // 2 from the top-left


def read_keypoints(path: str | Path) -> np.ndarray:
    """(N, 2) float32 (x, y) pixels from a `.kp` text file of `x y` rows (DIFT's SuperPoint-1k layout).

    DatasetError naming the file if it is missing, unreadable, empty, not two columns or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"keypoint file {path} does not exist; DIFT's SuperPoint keypoints ({SUPERPOINT_1K_URL}) hold one "
            "<sequence>-<k>.kp per image, or use the built-in keypoints 'sift' or 'grid'"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns about an empty file; the check below says more
            points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DatasetError(
            f"keypoint file {path} is not rows of numbers ({err}); write one 'x y' row per keypoint"
        ) from err
    if points.size == 0:
        raise DatasetError(f"keypoint file {path} holds no keypoints; write one 'x y' row per keypoint")
    if points.shape[1] != 2:
        raise DatasetError(
            f"keypoint file {path} has {points.shape[1]} columns per row (shape {points.shape}); expected 2, "
            "'x y' pixels per keypoint: drop any score or scale column"
        )
    if not np.isfinite(points).all():
        raise DatasetError(f"keypoint file {path} holds non-finite coordinates; fix or drop those rows")
    return points.astype(np.float32)


def sift_keypoints(image_path: str | Path, max_keypoints: int = SIFT_MAX_KEYPOINTS) -> np.ndarray:
    """(N <= max_keypoints, 2) float32 (x, y) pixels of OpenCV SIFT keypoints of the grayscale image,
    strongest response first (positions may repeat with different orientations)."""
    import cv2

    image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DatasetError(f"image {image_path} cannot be read by OpenCV; check that the file exists and re-download it")
    detected = cv2.SIFT_create(nfeatures=max_keypoints).detect(image, None)
    strongest = sorted(detected, key=lambda keypoint: -keypoint.response)[:max_keypoints]
    return np.array([keypoint.pt for keypoint in strongest], dtype=np.float32).reshape(-1, 2)


def grid_keypoints(image_size: tuple[int, int], spacing: int = GRID_SPACING) -> np.ndarray:
    """(N, 2) float32 (x, y) pixels of a regular grid over an image of size (H, W): every `spacing`
    pixels from spacing // 2, row by row."""
    if spacing < 1:
        raise InvalidArgumentError(f"grid spacing must be a positive number of pixels, got {spacing}")
    height, width = image_size
    xs = np.arange(spacing // 2, width, spacing)
    ys = np.arange(spacing // 2, height, spacing)
    grid_x, grid_y = np.meshgrid(xs, ys)
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32)


def describe_keypoints(source: str | Path) -> str:
    """Plain-language statement of a keypoint source, for the protocol card."""
    if source == "sift":
        return f"built-in OpenCV SIFT, the {SIFT_MAX_KEYPOINTS} strongest responses per image (not DIFT's SuperPoint)"
    if source == "grid":
        return f"built-in regular grid every {GRID_SPACING} px from {GRID_SPACING // 2} px (not DIFT's SuperPoint)"
    return f"files {Path(source)}/<sequence>-<k>.kp, x y pixels per row (DIFT: SuperPoint, 1k per image)"


def keypoints_for(source: str | Path, image: HPatchesImage) -> np.ndarray:
    """(N, 2) float32 (x, y) pixels of `image`'s keypoints from `source`: the name of a built-in
    detector ("sift", "grid") or a folder of `<sequence>-<k>.kp` files (a folder literally named
    like a detector must be given as a Path or with a leading ./)."""
    if isinstance(source, str) and source in KEYPOINT_DETECTORS:
        if source == "sift":
            return sift_keypoints(image.path)
        return grid_keypoints(image.size)
    folder = Path(source)
    if not folder.is_dir():
        raise DatasetError(
            f"keypoint folder {folder} does not exist; pass a folder of <sequence>-<k>.kp files (DIFT's "
            f"SuperPoint keypoints: {SUPERPOINT_1K_URL}) or one of the built-in detectors {KEYPOINT_DETECTORS}"
        )
    return read_keypoints(folder / f"{image.sequence}-{image.index}.kp")


def check_keypoint_files(source: str | Path, images: list[HPatchesImage]) -> None:
    """Read every image's keypoint file of folder `source` now (built-in detectors need none), so a missing,
    malformed or misplaced file is reported before any model loads; DatasetError naming the file.

    Keypoints must lie inside their image (x in 0..W-1, y in 0..H-1, up to half a pixel): points outside belong
    to another image or another resolution.
    """
    if isinstance(source, str) and source in KEYPOINT_DETECTORS:
        return
    for image in images:
        points = keypoints_for(source, image)
        height, width = image.size
        outside = (points[:, 0] < -0.5) | (points[:, 0] > width - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > height - 0.5)
        if outside.any():
            x, y = points[outside][0]
            raise DatasetError(
                f"keypoint file {Path(source) / f'{image.sequence}-{image.index}.kp'} has {int(outside.sum())} "
                f"keypoints outside its {width}x{height} image {image.path} (e.g. x={x:g}, y={y:g}); write x y pixels "
                "of that image (not of a resized copy), one keypoint per row"
            )
