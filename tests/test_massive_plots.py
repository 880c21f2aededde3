"""Every massive-activation figure is written as a non-empty PNG and PDF, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ditf.errors import InvalidArgumentError
from ditf.massive import plots
from ditf.massive.clustering import cluster_massive_tokens

GRID = (8, 12)


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    """(96, 48) tokens x channels with massive channels 11 (+400) and 42 (-250) on a bright patch."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(GRID[0] * GRID[1], 48, generator=generator)
    patch = torch.zeros(GRID, dtype=torch.bool)
    patch[2:6, 3:8] = True
    x[:, 11] += 400.0 + 20.0 * patch.flatten()
    x[:, 42] -= 250.0 - 10.0 * patch.flatten()
    return x


def assert_png_and_pdf(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not list(stem.parent.glob(".*.tmp"))


def test_activation_surface(tmp_path, activations):
    stem = tmp_path / "figures" / "surface"  # the folder is created
    assert_png_and_pdf(plots.plot_activation_surface(activations, stem, max_channels=16), stem)


def test_depth_profile(tmp_path):
    stem = tmp_path / "depth"
    top = torch.tensor([[400.0, 250.0, 5.0], [420.0, 260.0, 6.0], [430.0, 270.0, 60.0]])
    assert_png_and_pdf(plots.plot_depth_profile([0, 1, 2], top, [0.7, 0.7, 0.8], stem), stem)


def test_step_profile(tmp_path):
    stem = tmp_path / "steps"
    values = np.array([[300.0, 200.0], [350.0, 220.0], [400.0, 250.0]])
    written = plots.plot_step_profile([1000, 500, 0], values, ["ch 11", "ch 42"], stem, median=[0.7, 0.7, 0.7])
    assert_png_and_pdf(written, stem)


def test_channel_maps(tmp_path, activations):
    stem = tmp_path / "maps"
    assert_png_and_pdf(plots.plot_channel_maps(activations, [11, 42, 0], GRID, stem), stem)


def test_gate_alignment(tmp_path, activations):
    stem = tmp_path / "gate"
    gate, scale = torch.randn(48) * 0.1, torch.randn(48) * 0.1
    gate[11] = 2.0
    written = plots.plot_gate_alignment(activations.abs().mean(0), gate, stem, ma_channels=[11, 42], scale=scale)
    assert_png_and_pdf(written, stem)


def test_cluster_masks_with_and_without_an_image(tmp_path, activations):
    result = cluster_massive_tokens(activations, [11, 42], GRID)
    stem = tmp_path / "masks"
    assert_png_and_pdf(plots.plot_cluster_masks([result, result], stem, titles=["block 19", "block 28"]), stem)
    picture = np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3).astype(np.uint8)
    stem = tmp_path / "masks_on_image"
    assert_png_and_pdf(plots.plot_cluster_masks([result], stem, image=picture), stem)


def test_jaccard_matrix(tmp_path):
    stem = tmp_path / "jaccard"
    matrix = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    assert_png_and_pdf(plots.plot_jaccard_matrix(matrix, [0, 14, 27], stem), stem)


def test_plots_check_their_data(tmp_path, activations):
    with pytest.raises(InvalidArgumentError, match=r"grid_hw=\(9, 9\) does not hold N=96 tokens"):
        plots.plot_channel_maps(activations, [11], (9, 9), tmp_path / "maps")
    with pytest.raises(InvalidArgumentError, match="equal length"):
        plots.plot_gate_alignment(torch.ones(48), torch.ones(47), tmp_path / "gate")
    with pytest.raises(InvalidArgumentError, match="one row per block"):
        plots.plot_depth_profile([0, 1], torch.ones(3, 3), torch.ones(3), tmp_path / "depth")
    assert not list(tmp_path.iterdir())  # nothing is written for bad input
