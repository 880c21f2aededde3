"""Figures for massive-activation analysis, written as PNG and PDF.

Every function takes data (tensors or arrays, never a model) and an output path stem such as
`out/block28_surface`; it writes `<stem>.png` and `<stem>.pdf` atomically and returns their paths.
Figures are built on the Agg canvas without pyplot, so nothing touches global backend state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ditf.errors import InvalidArgumentError
from ditf.io import atomic_path
from ditf.massive.clustering import ClusterMasks
from ditf.channels import check_channels

FORMATS: tuple[str, ...] = ("png", "pdf")
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_MA_COLOUR = "#d62728"


ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{name} must be numeric (tensor, array or list); got {type(values).__name__}."
        ) from err


@contextlib.contextmanager
def _figure(width: float, height: float, **kwargs: Any) -> Iterator[Figure]:
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(width, height), layout="constrained", **kwargs)
        FigureCanvasAgg(figure)
        yield figure


def save_figure(figure: Figure, path_stem: str | os.PathLike[str], dpi: int = 200) -> list[Path]:
    """Write `figure` to `<path_stem>.png` and `.pdf` atomically (temp file, then os.replace); return the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        target = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(target) as temporary:
            figure.savefig(temporary, format=fmt, dpi=dpi)
        written.append(target)
    return written


def _tokens_by_channels(x: ArrayLike, name: str = "x") -> np.ndarray:
    values = _array(x, name)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2 or values.size == 0:
        raise InvalidArgumentError(
            f"{name} has shape {values.shape}; expected one sample's activations (N, C) or (1, N, C)."
        )
    return values


def _frame_image(axes: Any) -> None:
    """Image panels: no ticks, a full thin frame."""
    axes.set_xticks([])
    axes.set_yticks([])
    axes.spines[:].set_visible(True)
    axes.spines[:].set_linewidth(0.5)


def _max_pool(values: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Max over runs of consecutive columns so that at most `max_bins` remain; returns (pooled, run starts)."""
    width = -(-values.shape[1] // max_bins)
    starts = np.arange(0, values.shape[1], width)
    return np.maximum.reduceat(values, starts, axis=1), starts


def plot_activation_surface(
    x: ArrayLike,
    path_stem: str | os.PathLike[str],
    *,
    title: str | None = None,
    max_tokens: int = 48,
    max_channels: int = 1024,
    label_top: int = 2,
) -> list[Path]:
    """3-D plot of |x| over tokens x channels (the DiTF paper's Figs. 2-3, Sun et al.'s Fig. 1).

    x: (N, C) or (1, N, C) activations of one block and step. Each drawn line is one token's |x|
    across channels; at most `max_tokens` evenly spaced tokens are drawn, and more than
    `max_channels` channels are max-pooled in runs so single-channel spikes survive. The
    `label_top` channels with the largest |x| are labelled with their index.
    """
    magnitude = np.abs(_tokens_by_channels(x))
    num_tokens, num_channels = magnitude.shape
    token_rows = np.unique(np.linspace(0, num_tokens - 1, min(max_tokens, num_tokens)).round().astype(int))
    pooled, channel_starts = _max_pool(magnitude[token_rows], max_channels)
    channel_grid, token_grid = np.meshgrid(channel_starts, token_rows)
    peak = float(magnitude.max())
    with _figure(6.4, 4.6) as figure:
        axes = figure.add_subplot(projection="3d")
        axes.plot_wireframe(channel_grid, token_grid, pooled, rstride=1, cstride=0, color="royalblue", linewidth=0.7)
        axes.set_xlabel("channel")
        axes.set_ylabel("token")
        axes.set_zlabel("|activation|")
        axes.set_xlim(0, num_channels - 1)
        axes.set_ylim(0, num_tokens - 1)
        axes.set_zlim(0, peak * 1.1 if peak > 0 else 1.0)
        axes.view_init(elev=24, azim=-58)
        for channel in np.argsort(-magnitude.max(axis=0), kind="stable")[: max(0, label_top)]:
            axes.text(channel, num_tokens - 1, magnitude[:, channel].max() * 1.04, f"ch {channel}", color=_MA_COLOUR)
        axes.set_title(title or f"|activation| of {num_tokens} tokens x {num_channels} channels")
        return save_figure(figure, path_stem)


def plot_depth_profile(
    blocks: Sequence[int],
    top: ArrayLike,
    median: ArrayLike,
    path_stem: str | os.PathLike[str],
    *,
    title: str | None = None,
    log_scale: bool = True,
) -> list[Path]:
    """Top-n |x| and median |x| against block index (Sun et al.'s layer-wise profile).

    top: (n_blocks, n) largest magnitudes per block, descending; median: (n_blocks,). Use
    `ditf.massive.stats.depth_profile` to get them from a StatsTable.
    """
    top_values, median_values = _array(top, "top"), _array(median, "median")
    if top_values.ndim == 1:
        top_values = top_values[:, None]
    if top_values.shape[0] != len(blocks) or median_values.shape != (len(blocks),):
        raise InvalidArgumentError(
            f"top {top_values.shape} and median {median_values.shape} must have one row per block "
            f"({len(blocks)} blocks)."
        )
    with _figure(5.2, 3.4) as figure:
        axes = figure.add_subplot()
        for rank in range(top_values.shape[1]):
            axes.plot(blocks, top_values[:, rank], marker="o", markersize=3, label=f"top-{rank + 1}")
        axes.plot(blocks, median_values, marker="s", markersize=3, color="black", linestyle="--", label="median")
        if log_scale:
            axes.set_yscale("log")
        axes.set_xlabel("block")
        axes.set_ylabel("|activation|")
        axes.set_title(title or "Largest and median magnitudes across depth")
        axes.legend(frameon=False, loc="best")
        axes.grid(alpha=0.3)
        return save_figure(figure, path_stem)


def plot_step_profile(
    x_values: Sequence[float],
    values: ArrayLike,
    series_labels: Sequence[str],
    path_stem: str | os.PathLike[str],
    *,
    median: ArrayLike | None = None,
    x_label: str = "denoising step",
    y_label: str = "mean |activation|",
    title: str | None = None,
    log_scale: bool = False,
) -> list[Path]:
    """Magnitude of chosen channels against denoising step or timestep t.

    values: (n_steps, n_series), one column per channel; median: optional (n_steps,) reference line
    (median |x| over all entries). `ditf.massive.stats.step_profile` gives these from a StatsTable.
    """
    series = _array(values, "values")
    if series.ndim == 1:
        series = series[:, None]
    if series.shape != (len(x_values), len(series_labels)):
        raise InvalidArgumentError(
            f"values has shape {series.shape}; expected ({len(x_values)} steps, {len(series_labels)} series)."
        )
    with _figure(5.2, 3.4) as figure:
        axes = figure.add_subplot()
        for column, label in enumerate(series_labels):
            axes.plot(x_values, series[:, column], marker="o", markersize=3, label=label)
        if median is not None:
            axes.plot(x_values, _array(median, "median"), color="black", linestyle="--", label="median (all)")
        if log_scale:
            axes.set_yscale("log")
        if len(x_values) > 1 and x_values[0] > x_values[-1]:
            axes.invert_xaxis()  # timesteps fall as denoising proceeds: keep time running left to right
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.set_title(title or "Massive-channel magnitude across denoising")
        axes.legend(frameon=False, ncols=2 if len(series_labels) > 4 else 1)
        axes.grid(alpha=0.3)
        return save_figure(figure, path_stem)


def plot_channel_maps(
    x: ArrayLike,
    channels: Sequence[int],
    grid_hw: Sequence[int],
    path_stem: str | os.PathLike[str],
    *,
    title: str | None = None,
    columns: int = 4,
    cmap: str = "viridis",
) -> list[Path]:
    """One spatial map per channel on the latent token grid: x[:, c] reshaped to (h, w).

    x: (N, C) or (1, N, C) with N = h*w row-major. Each panel has its own colour range and bar.
    """
    values = _tokens_by_channels(x)
    channel_list = check_channels(channels, values.shape[1])
    if not channel_list:
        raise InvalidArgumentError("channels is empty; pass at least one channel to map.")
    if len(grid_hw) != 2 or grid_hw[0] * grid_hw[1] != values.shape[0]:
        raise InvalidArgumentError(
            f"grid_hw={tuple(grid_hw)} does not hold N={values.shape[0]} tokens; pass (h, w) with h*w = N."
        )
    h, w = int(grid_hw[0]), int(grid_hw[1])
    columns = max(1, min(columns, len(channel_list)))
    rows = -(-len(channel_list) // columns)
    panel = 2.3
    with _figure(panel * columns, panel * rows * h / w + 0.5) as figure:
        grid = figure.subplots(rows, columns, squeeze=False)
        for axes in grid.flat[len(channel_list) :]:
            axes.set_axis_off()
        for axes, channel in zip(grid.flat, channel_list):
            image = axes.imshow(values[:, channel].reshape(h, w), cmap=cmap, interpolation="nearest")
            axes.set_title(f"channel {channel}\nmean {values[:, channel].mean():.3g}")
            _frame_image(axes)
            figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03)
        figure.suptitle(title or f"Per-channel activation maps on the {h}x{w} token grid")
        return save_figure(figure, path_stem)


def plot_gate_alignment(
    magnitude: ArrayLike,
    gate: ArrayLike,
    path_stem: str | os.PathLike[str],
    *,
    ma_channels: Sequence[int] = (),
    scale: ArrayLike | None = None,
    magnitude_label: str = "mean |z| over tokens",
    title: str | None = None,
) -> list[Path]:
    """Per-channel |z| above the block's AdaLN gate alpha (and scale gamma): the DiTF paper's Fig. 4.

    magnitude, gate, scale: (C,) vectors of one block and step. MA channels are drawn and labelled in
    red in every panel, so peaks that line up are visible at a glance.
    """
    panels = [(magnitude_label, _array(magnitude, "magnitude")), ("gate alpha", _array(gate, "gate"))]
    if scale is not None:
        panels.append(("scale gamma", _array(scale, "scale")))
    num_channels = panels[0][1].shape[0]
    if any(values.shape != (num_channels,) for _, values in panels):
        raise InvalidArgumentError(
            f"magnitude, gate and scale must all be (C,) vectors of equal length; got "
            f"{[values.shape for _, values in panels]}."
        )
    highlighted = check_channels(ma_channels, num_channels, name="ma_channels")
    channel_index = np.arange(num_channels)
    with _figure(6.4, 1.7 * len(panels) + 0.6) as figure:
        grid = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for axes, (label, values) in zip(grid, panels):
            axes.vlines(channel_index, 0, values, color="#4c72b0", linewidth=0.8)
            axes.axhline(0, color="black", linewidth=0.5)
            if highlighted:
                axes.scatter(highlighted, values[highlighted], color=_MA_COLOUR, s=14, zorder=3)
                for channel in highlighted:
                    axes.annotate(
                        str(channel),
                        (channel, values[channel]),
                        textcoords="offset points",
                        xytext=(3, 3 if values[channel] >= 0 else -10),
                        color=_MA_COLOUR,
                        fontsize=8,
                    )
            axes.set_ylabel(label)
            axes.grid(alpha=0.3, axis="y")
        grid[-1].set_xlabel("channel")
        grid[-1].set_xlim(-0.5, num_channels - 0.5)
        figure.suptitle(title or "Residual-stream magnitude vs AdaLN modulation per channel (MA channels in red)")
        return save_figure(figure, path_stem)


def _image_array(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise InvalidArgumentError(f"image has shape {array.shape}; expected (H, W) or (H, W, 3|4).")
    if array.dtype.kind == "f":
        return np.clip(array, 0.0, 1.0)
    return array


def plot_cluster_masks(
    results: Sequence[ClusterMasks],
    path_stem: str | os.PathLike[str],
    *,
    titles: Sequence[str] | None = None,
    image: Any = None,
    title: str | None = None,
) -> list[Path]:
    """Heat map s (top row) and K-means foreground mask (bottom row) for each clustering result.

    results: one `ClusterMasks` per column (e.g. per block); image: optional (H, W, 3) array or PIL
    image the masks are stretched over (the token grid need not divide the image size).
    """
    if not results:
        raise InvalidArgumentError("results is empty; pass at least one ClusterMasks.")
    titles = list(titles) if titles is not None else [f"{len(r.channels)} channels" for r in results]
    if len(titles) != len(results):
        raise InvalidArgumentError(f"got {len(titles)} titles for {len(results)} results; pass one per result.")
    picture = None if image is None else _image_array(image)
    with _figure(2.4 * len(results) + 1.4, 5.0) as figure:
        grid = figure.subplots(2, len(results), squeeze=False)
        heat_image = None
        for column, (result, label) in enumerate(zip(results, titles)):
            heat_axes, mask_axes = grid[0, column], grid[1, column]
            heat_image = heat_axes.imshow(
                result.heatmap.numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest"
            )
            heat_axes.set_title(label)
            mask = result.mask.numpy().astype(float)
            if picture is None:
                mask_axes.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                height, width = picture.shape[:2]
                extent = (0, width, height, 0)
                mask_axes.imshow(picture, extent=extent, cmap="gray" if picture.ndim == 2 else None)
                overlay = np.zeros((*mask.shape, 4))
                overlay[mask > 0] = (0.2, 1.0, 0.2, 0.45)
                mask_axes.imshow(overlay, extent=extent, interpolation="nearest")
                cells_y = (np.arange(mask.shape[0]) + 0.5) * height / mask.shape[0]
                cells_x = (np.arange(mask.shape[1]) + 0.5) * width / mask.shape[1]
                if 0 < mask.sum() < mask.size:
                    mask_axes.contour(cells_x, cells_y, mask, levels=[0.5], colors="yellow", linewidths=1.5)
            mask_axes.set_title(f"foreground {100 * result.foreground_fraction:.0f}%")
            _frame_image(heat_axes)
            _frame_image(mask_axes)
        grid[0, 0].set_ylabel("heat map s")
        grid[1, 0].set_ylabel("K-means mask")
        figure.colorbar(
            heat_image, ax=grid[0, :].tolist(), fraction=0.03, pad=0.02, label="s: mean normalised MA value"
        )
        figure.suptitle(title or "Token clustering on massive channels")
        return save_figure(figure, path_stem)


def plot_jaccard_matrix(
    matrix: ArrayLike,
    labels: Sequence[Any],
    path_stem: str | os.PathLike[str],
    *,
    axis_label: str = "step",
    title: str | None = None,
) -> list[Path]:
    """Heat map of a Jaccard matrix (n, n) between MA channel sets (stability across steps/blocks/runs).

    NaN entries (two empty sets: the index is undefined) are drawn blank, without a number.
    """
    figure = jaccard_figure(matrix, labels, axis_label=axis_label, title=title)
    with matplotlib.rc_context(_STYLE):
        return save_figure(figure, path_stem)


def jaccard_figure(matrix: ArrayLike, labels: Sequence[Any], *, axis_label: str = "step",
                   title: str | None = None) -> Figure:
    """The figure of `plot_jaccard_matrix` (undefined entries masked: blank cells, no number)."""
    values = _array(matrix, "matrix")
    if values.ndim != 2 or values.shape != (len(labels), len(labels)):
        raise InvalidArgumentError(f"matrix has shape {values.shape}; expected ({len(labels)}, {len(labels)}).")
    size = min(7.0, 2.4 + 0.3 * len(labels))
    with _figure(size + 0.8, size) as figure:
        axes = figure.add_subplot()
        colours = matplotlib.colormaps["viridis"].with_extremes(bad="white")
        image = axes.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=0, vmax=1, interpolation="nearest")
        ticks = np.arange(len(labels))
        step = max(1, len(labels) // 16)
        names = [str(label) for label in labels]
        rotation = 90 if max(len(name) for name in names) > 3 else 0
        axes.set_xticks(ticks[::step], names[::step], rotation=rotation)
        axes.set_yticks(ticks[::step], names[::step])
        if len(labels) <= 12:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    if np.isnan(values[i, j]):
                        continue
                    colour = "black" if values[i, j] > 0.6 else "white"
                    axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
        axes.set_xlabel(axis_label)
        axes.set_ylabel(axis_label)
        axes.spines[:].set_visible(True)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="Jaccard index (blank: both sets empty)")
        axes.set_title(title or f"Stability of the MA set across {axis_label}s")
        return figure
