"""Spatial K-means clustering of image tokens on their massive channels."""

from __future__ import annotations

import pytest
import torch

from ditf.errors import InvalidArgumentError
from ditf.massive.clustering import (
    cluster_massive_tokens,
    kmeans,
    mask_iou,
    minmax_per_channel,
)

GRID = (16, 20)
MASSIVE = [3, 9]


def planted_square() -> torch.Tensor:
    """(16, 20) bool mask with a 6x7 foreground square at rows 4-9, columns 8-14."""
    square = torch.zeros(GRID, dtype=torch.bool)
    square[4:10, 8:15] = True
    return square


def activations_with_square(foreground_shift: float, seed: int = 0) -> torch.Tensor:
    """(N, 32) activations: channels 3 and 9 near 100 everywhere, shifted on the planted square."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(GRID[0] * GRID[1], 32, generator=generator)
    on_square = planted_square().flatten().float()
    for channel in MASSIVE:
        x[:, channel] = 100.0 + foreground_shift * on_square + 0.5 * torch.randn(x.shape[0], generator=generator)
    return x


def test_clustering_recovers_a_planted_foreground_square():
    result = cluster_massive_tokens(activations_with_square(foreground_shift=8.0), MASSIVE, GRID)

    assert result.mask.shape == GRID and result.mask.dtype == torch.bool
    assert torch.equal(result.mask, planted_square())
    assert result.heatmap.shape == GRID
    assert result.heatmap[planted_square()].mean() > 0.8 > 0.2 > result.heatmap[~planted_square()].mean()
    assert result.channels == MASSIVE


def test_foreground_is_the_cluster_with_the_higher_score():
    # The square now has the *lower* MA values, so the surrounding region is the foreground.
    result = cluster_massive_tokens(activations_with_square(foreground_shift=-8.0), MASSIVE, GRID)
    assert torch.equal(result.mask, ~planted_square())


def test_flipping_a_channels_sign_gives_the_same_mask_by_default():
    x = activations_with_square(foreground_shift=8.0)
    flipped = x.clone()
    flipped[:, 9] = -flipped[:, 9]  # channel 9 is now near -100 and more negative on the square (like FLUX's 154/1446)

    before, after = cluster_massive_tokens(x, MASSIVE, GRID), cluster_massive_tokens(flipped, MASSIVE, GRID)

    assert torch.equal(before.mask, planted_square()) and torch.equal(after.mask, planted_square())
    assert torch.equal(before.heatmap, after.heatmap)


def test_signed_values_cancel_across_opposite_channels():
    x = activations_with_square(foreground_shift=8.0)
    x[:, 9] = -x[:, 9]
    signed = cluster_massive_tokens(x, MASSIVE, GRID, signed=True)
    magnitude = cluster_massive_tokens(x, MASSIVE, GRID)

    assert torch.equal(signed.labels, magnitude.labels)  # the same partition either way ...
    assert signed.heatmap.std() < 0.25 * magnitude.heatmap.std()  # ... but the signed score is nearly flat


def test_batched_input_of_one_sample_is_accepted_and_results_are_seeded():
    x = activations_with_square(foreground_shift=8.0)[None]
    first = cluster_massive_tokens(x, MASSIVE, GRID, seed=7)
    second = cluster_massive_tokens(x, MASSIVE, GRID, seed=7)
    assert torch.equal(first.labels, second.labels) and first.inertia == second.inertia


def test_minmax_maps_each_channel_to_the_unit_interval_and_constants_to_zero():
    values = torch.tensor([[1.0, 5.0, -2.0], [3.0, 5.0, 0.0], [2.0, 5.0, 2.0]])
    assert minmax_per_channel(values).tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.5], [0.5, 0.0, 1.0]]


def test_kmeans_separates_two_blobs():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(40, 2, generator=generator), torch.randn(60, 2, generator=generator) + 10])
    labels, centers, _ = kmeans(points, 2, seed=1)
    assert labels[:40].unique().numel() == 1 and labels[40:].unique().numel() == 1 and labels[0] != labels[-1]
    assert sorted(centers[:, 0].round().tolist()) == [0.0, 10.0]


def test_kmeans_finds_the_optimum_of_a_case_solved_by_hand():
    """Two pairs of points 2 apart, 10 apart from each other: the optimum puts one centre in each pair's middle,
    every point 1 away from its centre, inertia 4 (the only other partitions cost at least 100)."""
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    for seed in range(5):
        labels, centers, inertia = kmeans(points, 2, seed=seed)
        assert labels[0] == labels[1] != labels[2] == labels[3]
        assert sorted(centers.tolist()) == [[0.0, 1.0], [10.0, 1.0]] and inertia == 4.0


def test_three_clusters_pick_the_highest_scoring_one():
    x = activations_with_square(foreground_shift=8.0)
    rows = torch.arange(GRID[0] * GRID[1]) // GRID[1]
    x[rows < 2, 3] += 16.0  # a third, stronger band on channel 3 only (top two rows)
    x[rows < 2, 9] += 16.0
    result = cluster_massive_tokens(x, MASSIVE, GRID, num_clusters=3)
    expected = torch.zeros(GRID, dtype=torch.bool)
    expected[:2] = True
    assert torch.equal(result.mask, expected)


def test_mask_iou_by_hand():
    a = torch.tensor([[True, True], [False, False]])
    b = torch.tensor([[True, False], [True, False]])
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0
    with pytest.raises(InvalidArgumentError, match="mask shapes differ"):
        mask_iou(a, torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid_hw": (16, 16)}, r"grid_hw=\(16, 16\) does not hold N=320 tokens"),
        ({"channels": [3, 32]}, r"channels \[32\] are out of range; valid channel indices are 0..31"),
        ({"channels": []}, "channels is empty"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    arguments = {"x": activations_with_square(8.0), "channels": MASSIVE, "grid_hw": GRID, **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        cluster_massive_tokens(**arguments)


def test_a_batch_of_several_samples_must_be_split():
    with pytest.raises(InvalidArgumentError, match=r"Cluster each batch item separately"):
        cluster_massive_tokens(torch.zeros(2, 320, 32), MASSIVE, GRID)


@pytest.mark.parametrize("block", [19, 24, 28])
def test_the_reference_flux_blocks_opposite_sign_channels_give_one_mask_whatever_their_signs(block):
    """The flux_tiny fixture's MAs are channel 11 (~ +400) and 42 (~ -250), like FLUX.1-dev's 154/1446 pair."""
    from pathlib import Path

    from safetensors.torch import load_file

    raw = load_file(Path(__file__).parent / "fixtures" / "flux_tiny" / "flux_tiny_case.safetensors")[f"k{block}_raw"]
    x = raw.flatten(1).T  # (C, h, w) -> (N, C)
    flipped = x.clone()
    flipped[:, 42] = -flipped[:, 42]
    grid = tuple(raw.shape[1:])

    assert torch.equal(cluster_massive_tokens(x, [11, 42], grid).mask, cluster_massive_tokens(flipped, [11, 42], grid).mask)
    signed, signed_flipped = (cluster_massive_tokens(v, [11, 42], grid, signed=True) for v in (x, flipped))
    assert torch.equal(signed.mask, ~signed_flipped.mask)  # on signed values the foreground is the other cluster
