"""Foreground/background masks from image tokens restricted to massive channels (Turri et al. 2026).

Order of operations (as the third-party reproduction of Turri et al.'s Fig. 3 pins it down):
1. keep the MA channels of the (N, C) image-token activations -> (N, k);
2. min-max normalise each kept channel across tokens to [0, 1] (a constant channel becomes 0);
3. K-means (K = 2 by default) on the k-dimensional token vectors;
4. heat map s = mean of the normalised channels per token; foreground = the cluster whose tokens
   have the higher mean s.

Step 2 normalises magnitudes |x| by default (our choice; the reproduction normalises signed values). Massive
channels often have opposite signs (FLUX.1-dev's 154 and 1446): on signed values a token high on one is low on
the other, the heat map s is nearly flat, and which cluster is the foreground flips with noise. `signed=True`
gives the reproduction's variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ditf.errors import InvalidArgumentError
from ditf.channels import check_channels


@dataclass(frozen=True, eq=False)
class ClusterMasks:
    """Result of clustering one (block, step) activation map on the token grid (h, w)."""

    mask: torch.Tensor  # (h, w) bool, True on the foreground cluster
    heatmap: torch.Tensor  # (h, w) float32 in [0, 1]: mean normalised MA activation per token
    labels: torch.Tensor  # (h, w) int64 cluster id per token
    foreground_cluster: int
    channels: list[int]
    inertia: float  # sum of squared distances of tokens to their cluster centre

    @property
    def foreground_fraction(self) -> float:
        """Share of tokens in the foreground cluster."""
        return float(self.mask.float().mean())


def minmax_per_channel(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each column of values (N, k) across the N tokens to [0, 1]; constant columns -> 0."""
    low = values.amin(dim=0, keepdim=True)
    span = values.amax(dim=0, keepdim=True) - low
    return (values - low) / torch.where(span > 0, span, torch.ones_like(span))


def _kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centers = [points[first[0]]]
    nearest = ((points - centers[0]) ** 2).sum(dim=1)
    for _ in range(1, num_clusters):
        total = nearest.sum()
        if total > 0:
            index = torch.multinomial(nearest / total, 1, generator=generator)[0]
        else:
            index = torch.randint(points.shape[0], (1,), generator=generator)[0]
        centers.append(points[index])
        nearest = torch.minimum(nearest, ((points - points[index]) ** 2).sum(dim=1))
    return torch.stack(centers)


def kmeans(
    points: torch.Tensor,
    num_clusters: int = 2,
    *,
    seed: int = 0,
    restarts: int = 4,
    max_iterations: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's K-means with k-means++ seeding; the restart with the lowest inertia wins.

    points: (N, D). Returns labels (N,) int64, centres (K, D) float64 and the inertia (sum of squared
    distances to the assigned centre). Deterministic for a given seed. An empty cluster is re-seeded
    at the point farthest from its centre.
    """
    if points.ndim != 2 or points.shape[0] < num_clusters or num_clusters < 1:
        raise InvalidArgumentError(
            f"kmeans needs points (N, D) with N >= num_clusters >= 1; got shape {tuple(points.shape)} and "
            f"num_clusters={num_clusters}. Use fewer clusters or more tokens."
        )
    data = points.double()
    generator = torch.Generator().manual_seed(int(seed))
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(max(1, int(restarts))):
        centers = _kmeans_plus_plus(data, num_clusters, generator)
        labels = torch.full((data.shape[0],), -1, dtype=torch.int64)
        for _ in range(int(max_iterations)):
            distances = torch.cdist(data, centers)
            new_labels = distances.argmin(dim=1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
            for cluster in range(num_clusters):
                members = labels == cluster
                if members.any():
                    centers[cluster] = data[members].mean(dim=0)
                else:
                    farthest = distances.min(dim=1).values.argmax()
                    centers[cluster] = data[farthest]
        inertia = float(((data - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centers, inertia)
    assert best is not None
    return best


def _check_grid(num_tokens: int, grid_hw: Sequence[int]) -> tuple[int, int]:
    if len(grid_hw) != 2 or grid_hw[0] * grid_hw[1] != num_tokens:
        raise InvalidArgumentError(
            f"grid_hw={tuple(grid_hw)} does not hold N={num_tokens} tokens; pass the latent token grid "
            "(h, w) with h*w = N (row-major), e.g. the image size divided by the patch stride."
        )
    return int(grid_hw[0]), int(grid_hw[1])


def cluster_massive_tokens(
    x: torch.Tensor,
    channels: Sequence[int],
    grid_hw: Sequence[int],
    *,
    num_clusters: int = 2,
    seed: int = 0,
    restarts: int = 4,
    signed: bool = False,
) -> ClusterMasks:
    """Cluster image tokens on their massive channels into a foreground mask and a heat map.

    x: (N, C) or (1, N, C) image-token activations of one block and step; channels: the MA channel
    indices; grid_hw: (h, w) with h*w = N, row-major. Returns masks on the (h, w) token grid.

    By default each channel's magnitude |x| is min-max normalised, so s ranks tokens by MA strength whatever
    the channels' signs, and flipping a channel's sign changes nothing. `signed=True` normalises the signed
    values (the reproduction's choice); channels of opposite sign then cancel in s.
    """
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise InvalidArgumentError(
            f"x has shape {tuple(x.shape)}; clustering takes one sample's tokens (N, C) or (1, N, C). "
            "Cluster each batch item separately: x[i]."
        )
    h, w = _check_grid(x.shape[0], grid_hw)
    channel_list = check_channels(channels, x.shape[1])
    if not channel_list:
        raise InvalidArgumentError("channels is empty; pass the MA channels to cluster on (at least one).")
    selected = x.detach()[:, channel_list].double()
    normalised = minmax_per_channel(selected if signed else selected.abs())
    labels, _, inertia = kmeans(normalised, num_clusters, seed=seed, restarts=restarts)
    score = normalised.mean(dim=1)
    cluster_scores = torch.stack(
        [score[labels == c].mean() if (labels == c).any() else score.new_tensor(-1.0) for c in range(num_clusters)]
    )
    foreground = int(cluster_scores.argmax())
    return ClusterMasks(
        mask=(labels == foreground).reshape(h, w),
        heatmap=score.float().reshape(h, w),
        labels=labels.reshape(h, w),
        foreground_cluster=foreground,
        channels=channel_list,
        inertia=inertia,
    )


def mask_iou(predicted: torch.Tensor, reference: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of equal shape; 1.0 when both are empty."""
    if predicted.shape != reference.shape:
        raise InvalidArgumentError(
            f"mask shapes differ: {tuple(predicted.shape)} vs {tuple(reference.shape)}; resize the reference "
            "mask to the token grid (nearest neighbour) first."
        )
    a, b = predicted.bool(), reference.bool()
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)
