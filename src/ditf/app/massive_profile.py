"""Per-channel magnitude of a block's raw input and the massive channels in it, for the app's tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditf.massive.detect import detect_ratio

RATIO_THRESHOLD = 100.0


@dataclass(frozen=True)
class MassiveProfile:
    """`mean_abs` (C,) float64: mean |z| over the tokens of each channel of the raw block input;
    `channels`: the massive channels by `detect_ratio` (median |z| >= `threshold` x the channel median)."""

    mean_abs: torch.Tensor
    channels: list[int]
    threshold: float

    def summary(self) -> str:
        """One line naming the detected channels and their mean |z|."""
        if not self.channels:
            return f"no massive channels (none has median |z| >= {self.threshold:g}x the channel median)"
        listed = ", ".join(f"{c} (mean |z| {float(self.mean_abs[c]):.3g})" for c in self.channels)
        median = float(self.mean_abs.median())
        return f"massive channels: {listed}; median channel mean |z| {median:.3g}"


def massive_profile(raw: torch.Tensor, threshold: float = RATIO_THRESHOLD) -> MassiveProfile:
    """Profile of a raw block input `raw` (C, h, w) (the ensemble-mean image tokens on their grid)."""
    tokens = raw.detach().double().flatten(1).T  # (N, C)
    return MassiveProfile(tokens.abs().mean(dim=0), detect_ratio(tokens, threshold=threshold), threshold)


def plot_massive_profile(profile: MassiveProfile, title: str = "") -> Any:
    """A matplotlib Figure: mean |z| per channel as thin bars, the massive channels marked and labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = profile.mean_abs.numpy()
    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.vlines(range(len(values)), 0.0, values, colors="#4c72b0", linewidth=0.8)
    for channel in profile.channels:
        axes.plot([channel], [values[channel]], "o", color="#d62728", markersize=6)
        axes.annotate(str(channel), (channel, values[channel]), textcoords="offset points", xytext=(4, 4),
                      color="#d62728", fontsize=9)
    axes.set_xlim(-0.5, len(values) - 0.5)
    axes.set_ylim(0.0, float(values.max()) * 1.12 if values.max() > 0 else 1.0)
    axes.set_xlabel("channel")
    axes.set_ylabel("mean |z| over tokens")
    axes.set_title(title or f"raw block input; red: massive channels (ratio rule, {profile.threshold:g}x)", fontsize=10)
    return figure
