"""PCA pictures of dense feature maps: the first three principal components shown as RGB.

The components are fitted jointly over every cell of every given map, so one colour means one
direction in feature space in all pictures: corresponding parts of different images get similar
colours. The fit is exact and deterministic: an eigendecomposition of the centred Gram matrix in
float64 (over cells or over channels, whichever is smaller), with the sign of each component fixed so
that its largest-magnitude channel loading is positive.

The foreground mode follows DINOv2's figures: threshold the first component to split foreground
from background, fit the three components again on the foreground cells only, and paint the
background black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError

NUM_COMPONENTS = 3
DEFAULT_FOREGROUND_THRESHOLD = 0.5
"""Foreground cut on the first component after min-max scaling to [0, 1] over all images."""


def principal_components(cells: torch.Tensor, count: int = NUM_COMPONENTS) -> torch.Tensor:
    """The top `count` principal directions (C, count), float64, of `cells` (N, C).

    Exact: eigenvectors of the centred Gram matrix (N x N or C x C, whichever is smaller). Each
    direction's sign is chosen so that its largest |loading| is positive (ties: the lowest channel),
    which makes the result independent of the order of the cells. Directions beyond the rank of
    the centred data (e.g. fewer cells than `count` + 1) are returned as zero columns.
    """
    data = cells.to(torch.float64)
    centred = data - data.mean(dim=0, keepdim=True)
    num_cells, channels = centred.shape
    kept = min(count, num_cells, channels)
    over_cells = num_cells <= channels
    gram = centred @ centred.T if over_cells else centred.T @ centred
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0)[:kept], vectors.flip(1)[:, :kept]
    directions = centred.T @ vectors if over_cells else vectors
    directions = directions / directions.norm(dim=0).clamp(min=1e-300)
    # Directions with no variance beyond rounding (rank tolerance as in numpy.linalg.matrix_rank) are zeroed.
    tolerance = values[:1].clamp(min=0.0) * max(num_cells, channels) * torch.finfo(torch.float64).eps
    directions = torch.where(values > tolerance, directions, torch.zeros_like(directions))
    largest = directions.abs().argmax(dim=0)
    signs = torch.sign(directions[largest, torch.arange(directions.shape[1])])
    directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs)
    padding = torch.zeros(channels, count - kept, dtype=torch.float64)
    return torch.cat([directions, padding], dim=1)


def pca_rgb(
    features: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]] | None = None,
    *,
    foreground: bool = False,
    threshold: float | None = None,
) -> list[np.ndarray]:
    """PCA pictures of feature maps: one (H, W, 3) uint8 RGB array per map.

    features: (C, h, w) float tensors, the same C for all (h, w may differ). The first three principal
    components are fitted jointly over all cells of all maps, each is min-max scaled to [0, 1] over all
    maps together and becomes the red, green and blue channel; the (h, w, 3) picture is then upsampled
    bilinearly (align_corners=False) to `sizes[i]` = (H, W) in pixels, or left at (h, w) when `sizes` is
    None. Deterministic: two calls give bit-identical arrays, and reordering the maps reorders the
    pictures without changing them (up to float rounding).

    foreground: split cells by the first component scaled to [0, 1] at `threshold` (default 0.5); the
    side covering less of the maps' border cells is the foreground (backgrounds touch the border). The
    components are then refitted on foreground cells only, and background cells are black.
    """
    maps = _check_features(features)
    sizes = _check_sizes(sizes, maps)
    check_threshold(threshold, foreground)
    cells = torch.cat([m.to(torch.float64).flatten(1).T for m in maps])  # (N, C)
    if foreground:
        keep = foreground_mask(maps, DEFAULT_FOREGROUND_THRESHOLD if threshold is None else float(threshold))
    else:
        keep = torch.ones(cells.shape[0], dtype=torch.bool)
    colours = torch.zeros(cells.shape[0], NUM_COMPONENTS, dtype=torch.float64)
    if bool(keep.any()):
        kept = cells[keep]
        scores = (kept - kept.mean(dim=0, keepdim=True)) @ principal_components(kept)
        colours[keep] = _min_max(scores)
    pictures = []
    start = 0
    for feature_map, size in zip(maps, sizes):
        h, w = feature_map.shape[1:]
        grid = colours[start : start + h * w].T.reshape(NUM_COMPONENTS, h, w)
        start += h * w
        if size != (h, w):
            grid = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
        pictures.append((grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return pictures


def check_threshold(threshold: float | None, foreground: bool) -> None:
    """Refuse a foreground `threshold` outside (0, 1), or one given without `foreground` (checked before any
    features are computed by callers that compute them)."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise InvalidArgumentError(
            f"threshold={threshold!r} must lie strictly between 0 and 1 (a cut on the first component scaled to "
            "[0, 1]); leave it out for 0.5."
        )
    if not foreground:
        raise InvalidArgumentError(f"threshold={threshold!r} only applies with foreground=True; pass foreground=True.")


def foreground_mask(features: Sequence[torch.Tensor], threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> torch.Tensor:
    """Boolean (N,) over all cells of `features` ((C, h, w) maps, cells in row-major order, map after map):
    True for the foreground side of the first principal component scaled to [0, 1] and cut at `threshold`.

    The side whose cells make up the smaller share of the maps' border cells is the foreground; on a
    tie, the side with fewer cells.
    """
    maps = _check_features(features)
    cells = torch.cat([m.to(torch.float64).flatten(1).T for m in maps])
    first = (cells - cells.mean(dim=0, keepdim=True)) @ principal_components(cells, count=1)
    high = _min_max(first)[:, 0] > threshold
    border = torch.cat([_border_cells(m.shape[1], m.shape[2]) for m in maps])
    high_share = float(high[border].double().mean())
    low_share = 1.0 - high_share
    if high_share < low_share or (high_share == low_share and int(high.sum()) <= int((~high).sum())):
        return high
    return ~high


def save_pca_figure(
    images: Sequence[Any],
    rgb_maps: Sequence[np.ndarray],
    path: str | Path,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG (or the format `path`'s suffix names) with one column per image: the image above its
    PCA picture. `images` are anything `ditf.features.preprocess.load_image` reads; `rgb_maps` the
    (H, W, 3) uint8 arrays of `pca_rgb`, one per image; `labels` optional column titles."""
    if len(images) == 0 or len(images) != len(rgb_maps):
        raise InvalidArgumentError(
            f"save_pca_figure got {len(images)} images and {len(rgb_maps)} PCA pictures; pass one picture per "
            "image (at least one)."
        )
    if labels is not None and len(labels) != len(images):
        raise InvalidArgumentError(f"labels has {len(labels)} entries for {len(images)} images; pass one per image.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ditf.features.preprocess import load_image
    from ditf.io import atomic_path

    count = len(images)
    loaded = [load_image(image) for image in images]
    aspect = max(image.height / image.width for image in loaded)
    extra = (0.35 if labels else 0.0) + (0.25 * (1 + title.count("\n")) if title else 0.0)
    figure = Figure(figsize=(3.2 * count, 2 * 3.2 * aspect + 0.2 + extra), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.asarray(figure.subplots(2, count, squeeze=False))
    for column, (image, picture) in enumerate(zip(loaded, rgb_maps)):
        axes[0, column].imshow(image)
        axes[1, column].imshow(picture)
        if labels is not None:
            axes[0, column].set_title(labels[column], fontsize=9)
        for row in range(2):
            axes[row, column].axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format=path.suffix.lstrip(".") or "png")
    return path


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale each column of (N, K) to [0, 1]; a constant column becomes 0."""
    low = values.min(dim=0).values
    span = values.max(dim=0).values - low
    return torch.where(span > 0, (values - low) / span.clamp(min=1e-300), torch.zeros_like(values))


def _border_cells(h: int, w: int) -> torch.Tensor:
    """Boolean (h * w,) marking the first and last row and column of an (h, w) grid."""
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    return border.flatten()


def _check_features(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        raise InvalidArgumentError(
            f"features must be a list of (C, h, w) tensors, got one tensor of shape {tuple(features.shape)}; "
            "wrap a single map as [feats] or split a batch with list(feats)."
        )
    maps = list(features)
    if not maps:
        raise InvalidArgumentError("features is an empty list; pass at least one (C, h, w) feature map.")
    for index, feature_map in enumerate(maps):
        if not isinstance(feature_map, torch.Tensor) or feature_map.ndim != 3 or min(feature_map.shape) < 1:
            shape = tuple(feature_map.shape) if isinstance(feature_map, torch.Tensor) else type(feature_map).__name__
            raise InvalidArgumentError(
                f"features[{index}] must be a non-empty (C, h, w) tensor, got {shape}; drop the batch axis."
            )
        if not feature_map.is_floating_point() or not bool(torch.isfinite(feature_map).all()):
            raise InvalidArgumentError(
                f"features[{index}] must hold finite floating-point values (dtype {feature_map.dtype}); "
                "check the extraction settings."
            )
    channels = [m.shape[0] for m in maps]
    if len(set(channels)) > 1:
        raise InvalidArgumentError(
            f"features have different channel counts {channels}; extract all images with the same model and "
            "block so the maps share one feature space."
        )
    return [m.detach().cpu() for m in maps]


def _check_sizes(sizes: Sequence[tuple[int, int]] | None, maps: list[torch.Tensor]) -> list[tuple[int, int]]:
    if sizes is None:
        return [(m.shape[1], m.shape[2]) for m in maps]
    sizes = list(sizes)
    if len(sizes) != len(maps):
        raise InvalidArgumentError(
            f"sizes has {len(sizes)} entries for {len(maps)} feature maps; pass one (H, W) per map or None."
        )
    checked = []
    for index, size in enumerate(sizes):
        if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
            raise InvalidArgumentError(f"sizes[{index}]={tuple(size)} must be (H, W) with positive sides in pixels.")
        checked.append((int(size[0]), int(size[1])))
    return checked
