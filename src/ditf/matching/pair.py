"""Match points from one image to another with dense features, and draw the result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditf.errors import InvalidArgumentError
from ditf.io import atomic_path
from ditf.matching.correspondence import cosine_map
from ditf.matching.points import check_points_inside


@dataclass
class PairMatch:
    """Matches for P source points. Points are integer (x, y) pixels of the original images;
    `cosine` (P,) is the best cosine similarity; `heatmaps` (P, H_trg, W_trg) the full cosine maps."""

    source: torch.Tensor
    target: torch.Tensor
    cosine: torch.Tensor
    heatmaps: torch.Tensor

    def to_json(self) -> dict:
        """{"source": [[x, y], ...], "target": [[x, y], ...], "cosine": [...]}."""
        return {"source": self.source.tolist(), "target": self.target.tolist(),
                "cosine": [round(float(c), 6) for c in self.cosine]}


def parse_points(text: str) -> torch.Tensor:
    """"x1,y1;x2,y2" -> (P, 2) int64 tensor of (x, y) pixels."""
    try:
        points = [[int(round(float(v))) for v in item.split(",")] for item in text.split(";") if item.strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"--points {text!r} is not 'x,y;x,y;...' in pixels ({err}).") from err
    if not points or any(len(p) != 2 for p in points):
        raise InvalidArgumentError(f"--points {text!r} is not 'x,y;x,y;...' in pixels, e.g. '120,88;300,140'.")
    return torch.tensor(points, dtype=torch.int64)


def match_pair(src_feats: torch.Tensor, trg_feats: torch.Tensor, points: torch.Tensor,
               src_size: tuple[int, int], trg_size: tuple[int, int]) -> PairMatch:
    """Match `points` (P, 2) (x, y) of the source image into the target image.

    Feature maps (C, h, w) are taken as bilinearly upsampled to the image sizes (H, W) (computed exactly
    from the low-resolution maps); the match is the cosine argmax.
    """
    check_points_inside(points, src_size, "source points")
    maps = cosine_map(src_feats, trg_feats, points, src_size, trg_size).float()
    best = maps.flatten(1).argmax(dim=1)
    target = torch.stack(torch.unravel_index(best, tuple(trg_size))[::-1], dim=1)
    return PairMatch(points, target, maps.flatten(1).max(dim=1).values, maps)


def plot_pair_matches(src_image: Image.Image, trg_image: Image.Image, match: PairMatch, path: str | Path,
                      max_heatmaps: int = 6, title: str | None = None) -> Path:
    """Figure: source and target with colour-matched points, and a cosine heat map per point (up to
    `max_heatmaps`) over the target, under `title`. Written as PNG (or whatever `path`'s suffix says)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_points = len(match.source)
    shown = min(n_points, max_heatmaps)
    colours = plt.get_cmap("tab10")(np.arange(n_points) % 10)
    fig = plt.figure(figsize=(max(8.0, 2.6 * shown), 7.0 if shown else 4.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.6, 1.0]) if shown else (fig, None)
    for ax, image, points, panel in zip(top.subplots(1, 2), (src_image, trg_image), (match.source, match.target),
                                        ("source points", "predicted target points")):
        ax.imshow(image)
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=70, edgecolors="white", linewidths=1.5)
        ax.set_title(panel)
        ax.axis("off")
    if bottom is not None:
        for i, ax in enumerate(np.atleast_1d(bottom.subplots(1, shown))):
            heat = match.heatmaps[i].numpy()
            ax.imshow(trg_image)
            im = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=float(heat.min()), vmax=float(heat.max()))
            ax.scatter([match.target[i, 0]], [match.target[i, 1]], c=[colours[i]], s=60, edgecolors="white", linewidths=1.5)
            ax.set_title(f"point {i}: cosine map (best {float(match.cosine[i]):.3f})", fontsize=9, color=colours[i])
            ax.axis("off")
            bottom.colorbar(im, ax=ax, shrink=0.7, location="bottom", format="%.2f")
    if title:
        fig.suptitle(title, color="firebrick", fontsize=12)
    path = Path(path)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path
