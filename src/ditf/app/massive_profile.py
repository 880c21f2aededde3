"""Per-channel magnitude of a block's raw input, with the massive channels DiTF's rule detects, for the app's tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditf.channels import MASSIVE_RATIO, median_abs, ratio_channels


@dataclass(frozen=True)
class MassiveProfile:
    """`median_abs` (C,) fp32: median |z| over the tokens of each channel of the raw block input; `channels`:
    the massive ones by `ditf.channels`' ratio rule (median |z| >= `ratio` x the median over channels), the rule
    the `ditf` variant's `discard="auto"` applies when the model has no verified channels."""

    median_abs: torch.Tensor
    channels: list[int]
    ratio: float

    @property
    def threshold(self) -> float:
        """The |z| a channel's median must reach to count as massive."""
        return self.ratio * float(self.median_abs.median())

    def summary(self) -> str:
        """One line naming the detected channels and their median |z|."""
        if not self.channels:
            return f"no massive channels (none has median |z| >= {self.ratio:g} x the median over channels)"
        listed = ", ".join(f"{c} (median |z| {float(self.median_abs[c]):.3g})" for c in self.channels)
        return (f"massive channels: {listed}; median over channels {float(self.median_abs.median()):.3g}, "
                f"rule: >= {self.ratio:g}x that")


def massive_profile(raw: torch.Tensor, ratio: float = MASSIVE_RATIO) -> MassiveProfile:
    """Profile of a raw block input `raw` (C, h, w): the ensemble-mean image tokens on their grid (the `raw`
    variant's feature map)."""
    per_channel = median_abs(raw.flatten(1).T)
    return MassiveProfile(per_channel, ratio_channels(per_channel, ratio), float(ratio))


def plot_massive_profile(profile: MassiveProfile, title: str = "") -> Any:
    """A matplotlib Figure: median |z| per channel as thin bars (log scale), the rule's threshold as a dashed
    line, the massive channels marked and labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = profile.median_abs.numpy()
    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    floor = max(float(values[values > 0].min()) / 2 if (values > 0).any() else 1e-6, 1e-12)
    axes.vlines(range(len(values)), floor, values.clip(min=floor), colors="#4c72b0", linewidth=0.8)
    axes.axhline(max(profile.threshold, floor), color="#888888", linestyle="--", linewidth=0.8,
                 label=f"{profile.ratio:g} x median")
    for channel in profile.channels:
        axes.plot([channel], [values[channel]], "o", color="#d62728", markersize=6)
        axes.annotate(str(channel), (channel, values[channel]), textcoords="offset points", xytext=(4, 4),
                      color="#d62728", fontsize=9)
    axes.set_yscale("log")
    axes.set_xlim(-0.5, len(values) - 0.5)
    axes.set_xlabel("channel")
    axes.set_ylabel("median |z| over tokens")
    axes.legend(loc="upper right", fontsize=8)
    axes.set_title(title or "raw block input; red: massive channels", fontsize=10)
    return figure
