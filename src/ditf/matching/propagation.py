"""Video label propagation by feature affinity (the DINO protocol, with DiTF's settings).

Given dense features for every frame of a video and the first frame's label map, each later frame's
labels are a weighted vote of the labels of a few context frames: the first frame (ground truth)
and the `n_last_frames` previous frames (their propagated soft labels). For every target location:

1. affinity to every context location = exp(cosine / temperature);
2. only context locations within a square window of `neighborhood_radius` feature cells
   (Chebyshev distance) around the target location count;
3. only the `topk` largest affinities over all context frames are kept (ties with the k-th value
   are kept too), normalised to sum to 1;
4. the soft labels of those locations are averaged with these weights.

Labels live on the feature grid: the first mask is resized (nearest) to (h, w) and one-hot encoded
with `max label + 1` channels. Output label maps are the soft labels upsampled bilinearly by the
feature stride, min-max normalised per label, argmax-ed, and resized (nearest) to the mask size.
This follows facebookresearch/dino `eval_video_segmentation.py`, which DIFT and DiTF reuse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ditf.errors import InvalidArgumentError
from ditf.registry import TASK_DEFAULTS

PROPAGATION_DEFAULTS = TASK_DEFAULTS["davis"].protocol


@dataclass(frozen=True)
class PropagationSettings:
    """Label-propagation hyper-parameters (units: frames, feature cells, count, none); DiTF's by default."""

    n_last_frames: int = PROPAGATION_DEFAULTS["n_last_frames"]
    neighborhood_radius: int = PROPAGATION_DEFAULTS["neighborhood_radius"]
    topk: int = PROPAGATION_DEFAULTS["topk"]
    temperature: float = PROPAGATION_DEFAULTS["temperature"]

    def __post_init__(self) -> None:
        checks = [
            ("n_last_frames", self.n_last_frames, self.n_last_frames >= 0, "a whole number >= 0"),
            ("neighborhood_radius", self.neighborhood_radius, self.neighborhood_radius >= 0, "a whole number >= 0"),
            ("topk", self.topk, self.topk >= 1, "a whole number >= 1"),
            ("temperature", self.temperature, self.temperature > 0, "a number > 0"),
        ]
        for name, value, valid, expected in checks:
            if not valid:
                raise InvalidArgumentError(f"{name}={value!r} is invalid; it must be {expected}.")


DITF_DAVIS_PROPAGATION = PropagationSettings()
"""DiTF's DAVIS settings (the davis task preset in `ditf.registry`): first frame plus 7 previous frames, window
radius 12 cells, top-5, temperature 0.1."""


def neighborhood_mask(height: int, width: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which source cells each target cell may take labels from: a square window of `radius` cells.

    Args:
        height, width: feature-grid size (cells).
        radius: half-width of the window in cells; the window is (2 * radius + 1) cells wide,
            clipped at the grid border.

    Returns:
        (height * width, height * width) bool tensor; entry [target, source] (row-major cell
        indices) is True when |row difference| <= radius and |column difference| <= radius.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    rows_close = (rows[:, None] - rows[None, :]).abs() <= radius  # (h, h)
    cols_close = (cols[:, None] - cols[None, :]).abs() <= radius  # (w, w)
    mask = rows_close[:, None, :, None] & cols_close[None, :, None, :]  # (h, w, h, w)
    return mask.reshape(height * width, height * width)


def downsample_labels(labels: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map to `grid_size` = (h, w); returns (h, w) uint8."""
    h, w = grid_size
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))


def labels_to_one_hot(labels: np.ndarray, n_labels: int) -> torch.Tensor:
    """(h, w) integer labels -> (n_labels, h, w) float32 one-hot."""
    index = torch.from_numpy(labels.astype(np.int64))
    return F.one_hot(index, n_labels).permute(2, 0, 1).float()


def soft_labels_to_label_map(soft_labels: torch.Tensor, stride: int, output_size: tuple[int, int]) -> np.ndarray:
    """Turn (L, h, w) soft labels into an (H, W) uint8 label map, as DINO does.

    Upsample bilinearly by `stride` (align_corners=False), min-max normalise each label channel
    whose maximum is positive, take the argmax (first label on ties), then resize (nearest) to
    `output_size` = (H, W).
    """
    upsampled = F.interpolate(soft_labels[None].float(), scale_factor=stride, mode="bilinear", align_corners=False)[0]
    minimum = upsampled.amin(dim=(1, 2), keepdim=True)
    maximum = upsampled.amax(dim=(1, 2), keepdim=True)
    spread = maximum - minimum
    rescale = (maximum > 0) & (spread > 0)
    normalised = torch.where(rescale, (upsampled - minimum) / torch.where(rescale, spread, 1.0), upsampled)
    # argmax over a contiguous last axis is much faster than over the leading one
    label_map = normalised.permute(1, 2, 0).contiguous().argmax(dim=-1).to(torch.uint8).cpu().numpy()
    height, width = output_size
    return np.asarray(Image.fromarray(label_map).resize((width, height), Image.NEAREST))


def propagate_soft_labels(
    target_features: torch.Tensor,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    allowed: torch.Tensor,
    topk: int,
    temperature: float,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """One propagation step: soft labels of a target frame from its context frames.

    Args:
        target_features: (C, N) L2-normalised features of the target frame (N = h * w cells).
        context_features: (K, C, N) L2-normalised features of the K context frames.
        context_labels: (K, L, N) soft labels of the context frames.
        allowed: (N, N) bool neighbourhood mask [target cell, source cell].
        topk: affinities kept per target cell, over all K * N context cells.
        temperature: affinity = exp(cosine / temperature).
        query_chunk: target cells processed at once; memory grows as K * N * query_chunk floats.
            None picks the chunk so that one affinity block holds about 2**24 values (64 MB).

    Returns:
        (L, N) soft labels of the target frame; each column sums to 1.
    """
    n_context, _, n_cells = context_features.shape
    n_labels = context_labels.shape[1]
    sources = context_features.permute(1, 0, 2).reshape(context_features.shape[1], n_context * n_cells)
    source_labels = context_labels.permute(0, 2, 1).reshape(n_context * n_cells, n_labels)
    if query_chunk is None:
        query_chunk = max(1, 2**24 // (n_context * n_cells))
    out = torch.empty(n_labels, n_cells, dtype=torch.float32, device=target_features.device)
    for start in range(0, n_cells, query_chunk):
        stop = min(start + query_chunk, n_cells)
        cosine = target_features[:, start:stop].T.float() @ sources.float()  # (q, K * N)
        affinity = torch.exp(cosine / temperature).view(stop - start, n_context, n_cells)
        affinity = (affinity * allowed[start:stop, None, :]).view(stop - start, n_context * n_cells)
        kth_largest = torch.topk(affinity, k=min(topk, affinity.shape[1]), dim=1).values[:, -1:]
        affinity = torch.where(affinity < kth_largest, torch.zeros_like(affinity), affinity)
        affinity = affinity / affinity.sum(dim=1, keepdim=True)
        out[:, start:stop] = (affinity @ source_labels.float()).T
    return out


def propagate_labels(
    frame_features: Iterable[torch.Tensor],
    first_mask: np.ndarray | torch.Tensor,
    *,
    stride: int,
    settings: PropagationSettings = DITF_DAVIS_PROPAGATION,
    query_chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """Propagate the first frame's labels through a video, one frame at a time.

    Args:
        frame_features: the video's per-frame features, first frame included, each (C, h, w) on the
            same grid; consumed lazily (one extraction per yielded frame).
        first_mask: (H, W) integer labels of the first frame (0 background, 1..L-1 objects, < 256).
        stride: pixels of the resized frame per feature cell (16 for FLUX); the soft labels are
            upsampled by this factor before the final nearest resize to (H, W).
        settings: context size, window radius (cells), top-k and temperature.
        query_chunk: target cells per affinity block (None: about 64 MB per block).

    Yields:
        (H, W) uint8 label maps for frames 1, 2, ... (the first frame is not repeated).
    """
    _check_settings(settings, stride)
    mask = np.asarray(first_mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() > 255:
        raise InvalidArgumentError(
            f"first_mask must be a 2-D integer label map with values in 0..255; got shape {mask.shape}, "
            f"dtype {mask.dtype}. Pass the first frame's annotation as read from its indexed PNG."
        )
    n_labels = int(mask.max()) + 1
    frames = iter(frame_features)
    first = next(frames, None)
    if first is None:
        return
    grid = _grid_size(first, frame_index=0)
    first_features = _normalised_cells(first)
    first_labels = labels_to_one_hot(downsample_labels(mask, grid), n_labels).reshape(n_labels, -1)
    first_labels = first_labels.to(first_features.device)
    allowed = neighborhood_mask(*grid, settings.neighborhood_radius, device=first_features.device)
    recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames)
    for index, features in enumerate(frames, start=1):
        if _grid_size(features, frame_index=index) != grid:
            raise InvalidArgumentError(
                f"frame {index} features have grid {tuple(features.shape[-2:])} but frame 0 has {grid}; "
                "every frame of a video must be extracted at the same size."
            )
        target = _normalised_cells(features)
        context_features = torch.stack([first_features] + [f for f, _ in recent])
        context_labels = torch.stack([first_labels] + [s for _, s in recent])
        soft = propagate_soft_labels(
            target, context_features, context_labels, allowed, settings.topk, settings.temperature, query_chunk
        )
        if settings.n_last_frames > 0:
            recent.append((target, soft))
        yield soft_labels_to_label_map(soft.reshape(n_labels, *grid), stride, mask.shape)


def _check_settings(settings: PropagationSettings, stride: int) -> None:
    if not isinstance(stride, int) or stride < 1:
        raise InvalidArgumentError(f"stride={stride!r} is invalid; it must be a whole number >= 1 (16 for FLUX).")


def _grid_size(features: torch.Tensor, frame_index: int) -> tuple[int, int]:
    if not isinstance(features, torch.Tensor) or features.ndim != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InvalidArgumentError(
            f"frame {frame_index} features must be a (C, h, w) tensor; got {shape}. "
            "Drop the batch dimension of a (1, C, h, w) featurizer output with [0]."
        )
    return int(features.shape[1]), int(features.shape[2])


def _normalised_cells(features: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (C, h * w) float32, each cell's vector scaled to unit L2 norm."""
    cells = features.float().reshape(features.shape[0], -1)
    return F.normalize(cells, dim=0)
