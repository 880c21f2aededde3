"""Plots of a segmentation probe run: the training loss curve and the per-class IoU of its scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditf.eval.ade20k import ADE20K_CLASSES
from ditf.io import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or "png")
    return path


def plot_loss_curve(losses: Sequence[float], path: str | Path, smoothing: int = 50) -> Path:
    """Training cross-entropy per step (light) and its running mean over `smoothing` steps; saved atomically.

    Args:
        losses: loss of every optimizer step, in order (nats per labelled pixel).
        path: the image file to write (format from the suffix, PNG by default).
        smoothing: window of the running mean, in steps (clipped to the number of steps).
    """
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(losses) + 1)
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    window = max(1, min(smoothing, len(losses)))
    if len(losses) >= window > 1:
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1 :], running, color="tab:blue", label=f"mean of {window} steps")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / labelled pixel)")
    axes.set_title("segmentation probe training loss")
    if len(losses):
        axes.legend(loc="upper right")
    return _save(figure, path)


def plot_class_iou(scores: dict[str, Any], path: str | Path, class_names: Sequence[str] = ADE20K_CLASSES) -> Path:
    """Bar chart of the per-class IoU of `score_segmentation` scores, sorted, with mIoU as a line; saved atomically.

    `class_names[id - 1]` labels class id `id` (ADE20K names by default).
    """
    per_class = sorted(scores["per_class"].items(), key=lambda item: -item[1]["IoU"])
    names = [f"{class_names[int(key) - 1]} ({key})" for key, _ in per_class]
    values = [entry["IoU"] for _, entry in per_class]
    figure = _figure(max(6.0, 0.18 * len(names) + 2), 4.5)
    axes = figure.add_subplot()
    axes.bar(np.arange(len(names)), values, color="tab:green")
    axes.axhline(scores["mIoU"], color="black", linestyle="--", label=f"mIoU {scores['mIoU']:.1f}")
    axes.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=6)
    axes.set_ylim(0, 100)
    axes.set_ylabel("IoU (%)")
    axes.set_title(f"per-class IoU, aAcc {scores['aAcc']:.1f}, mAcc {scores['mAcc']:.1f}")
    axes.legend(loc="upper right")
    return _save(figure, path)
