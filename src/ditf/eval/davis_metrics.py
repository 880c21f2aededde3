"""DAVIS-2017 region (J) and boundary (F) measures, equal to the official davis2017-evaluation.

The official toolkit (github.com/davisvideochallenge/davis2017-evaluation, `davis2017/metrics.py`
and `utils.py`) defines, per object and frame:

- J: intersection over union of the binary masks; 1 when both are empty.
- F: boundary F-measure. Each mask's 1-pixel boundary map marks pixels that differ from their
  east, south or south-east neighbour. A boundary pixel matches when the other map has a boundary
  pixel within a disk of radius `ceil(bound_th * ||(H, W)||)` pixels (8 px at 854x480). The toolkit
  dilates with `cv2.dilate` and a `skimage` disk {x^2 + y^2 <= r^2}; we test the same condition with
  scipy's exact Euclidean distance transform (a pixel lies in that dilation iff its distance to the
  nearest boundary pixel is at most r), which needs neither OpenCV nor scikit-image and is faster.

and per object over frames: Mean (nan-mean), Recall (share of frames above 0.5) and Decay (mean of
the first quarter of the frames minus the mean of the last quarter).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

OFFICIAL_BOUNDARY_THRESHOLD = 0.008
"""The toolkit's `bound_th`: boundary tolerance as a fraction of the image diagonal."""


def region_similarity(gt_masks: np.ndarray, pred_masks: np.ndarray) -> np.ndarray:
    """J per frame: IoU of binary masks, 1 where both masks are empty.

    Args:
        gt_masks: (T, H, W) or (H, W) boolean ground-truth masks of one object.
        pred_masks: the predicted masks, same shape.

    Returns:
        (T,) float64 IoU per frame (a 0-d array for a single frame).
    """
    gt = gt_masks.astype(bool)
    pred = pred_masks.astype(bool)
    intersection = np.sum(gt & pred, axis=(-2, -1))
    union = np.sum(gt | pred, axis=(-2, -1))
    empty = union == 0
    return np.where(empty, 1.0, intersection / np.maximum(union, 1))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The toolkit's 1-pixel boundary map: pixels differing from their E, S or SE neighbour.

    Neighbours outside the image count as background, except that the last row compares only with
    its east neighbour, the last column only with its south neighbour, and the bottom-right pixel is
    never a boundary pixel.

    Args:
        mask: (H, W) binary mask.

    Returns:
        (H, W) boolean boundary map.
    """
    seg = mask.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_tolerance(height: int, width: int, bound_th: float = OFFICIAL_BOUNDARY_THRESHOLD) -> int:
    """Radius in pixels of the matching disk: `bound_th` itself if >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(height, width)))


def _within_disk_of(boundary: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) boolean: pixels whose Euclidean distance to a True pixel of `boundary` is <= radius.

    Exact for integer radii: squared pixel distances are integers and sqrt(r^2) == r in floating point.
    """
    return ndimage.distance_transform_edt(~boundary) <= radius


def _crop_to_boundaries(*maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Crop boundary maps to the bounding box of all their True pixels.

    Distances between boundary pixels do not depend on the image border, so the matches are unchanged.
    """
    rows, cols = np.nonzero(np.logical_or.reduce(maps))
    window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return tuple(m[window] for m in maps)


def boundary_f_measure(
    gt_mask: np.ndarray, pred_mask: np.ndarray, bound_th: float = OFFICIAL_BOUNDARY_THRESHOLD
) -> float:
    """F for one object in one frame: harmonic mean of boundary precision and recall.

    Empty boundaries follow the toolkit: prediction empty and ground truth not -> P=1, R=0;
    ground truth empty and prediction not -> P=0, R=1; both empty -> F=1.

    Args:
        gt_mask: (H, W) binary ground-truth mask.
        pred_mask: (H, W) binary predicted mask.
        bound_th: tolerance as a fraction of the image diagonal (or in pixels if >= 1).

    Returns:
        F in [0, 1].
    """
    pred_boundary = boundary_map(pred_mask)
    gt_boundary = boundary_map(gt_mask)
    n_pred = int(pred_boundary.sum())
    n_gt = int(gt_boundary.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    radius = boundary_tolerance(*gt_mask.shape, bound_th=bound_th)
    pred_boundary, gt_boundary = _crop_to_boundaries(pred_boundary, gt_boundary)
    precision = np.sum(pred_boundary & _within_disk_of(gt_boundary, radius)) / float(n_pred)
    recall = np.sum(gt_boundary & _within_disk_of(pred_boundary, radius)) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def boundary_f_measures(
    gt_masks: np.ndarray, pred_masks: np.ndarray, bound_th: float = OFFICIAL_BOUNDARY_THRESHOLD
) -> np.ndarray:
    """F per frame for (T, H, W) binary ground-truth and predicted masks of one object; returns (T,)."""
    return np.array([boundary_f_measure(gt, pred, bound_th) for gt, pred in zip(gt_masks, pred_masks)])


def decay_bins(n_frames: int) -> list[slice]:
    """The toolkit's four inclusive frame bins for Decay: edges round(linspace(1, n, 5)) - 1.

    The toolkit stores the edges as uint8, which wraps around beyond 256 frames; we keep plain
    integers (identical for every DAVIS sequence, the longest of which has 104 frames).
    """
    edges = (np.round(np.linspace(1, n_frames, 5) + 1e-10) - 1).astype(int)
    return [slice(edges[i], edges[i + 1] + 1) for i in range(4)]


def sequence_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame J or F values, shape (T,).

    Mean ignores NaNs; Recall is the share of frames with a value above 0.5; Decay is the mean of the
    first quarter of the frames minus the mean of the last quarter (bins from `decay_bins`).
    """
    values = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        bins = decay_bins(len(values))
        decay = float(np.nanmean(values[bins[0]]) - np.nanmean(values[bins[3]]))
    return mean, recall, decay
