"""Exact full-resolution cosine matching from low-resolution maps (ditf.matching.correspondence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ditf.errors import InvalidArgumentError
from ditf.matching.correspondence import (
    cosine_map,
    interpolation_matrix,
    match_points,
    match_points_lowres,
    upsample_then_match,
    upsampled_sq_norms,
    upsampled_vectors,
)

FIXTURES = Path(__file__).parent / "fixtures"


def random_case(seed: int, channels: int, src_grid, trg_grid, src_size, trg_size, num_points: int = 6):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(channels, *src_grid, generator=generator)
    trg = torch.randn(channels, *trg_grid, generator=generator)
    points = torch.stack(
        [torch.randint(0, src_size[1], (num_points,), generator=generator),
         torch.randint(0, src_size[0], (num_points,), generator=generator)],
        dim=1,
    )
    return src, trg, points


CASES = [
    # channels, src grid (h, w), trg grid, src size (H, W), trg size
    (64, (30, 40), (27, 40), (375, 500), (333, 500)),  # DiTF-like: stride 16, 4:3 and 3:2 images
    (3, (5, 7), (6, 4), (41, 23), (37, 52)),  # non-integer scale factors
    (8, (1, 9), (9, 1), (17, 30), (30, 17)),  # single row / column grids (pure clamping)
    (5, (12, 12), (10, 14), (8, 9), (7, 11)),  # output smaller than the grid (downsampling)
]


@pytest.mark.parametrize("channels, src_grid, trg_grid, src_size, trg_size", CASES)
def test_cosine_map_equals_materialised_upsampling(channels, src_grid, trg_grid, src_size, trg_size):
    src, trg, points = random_case(0, channels, src_grid, trg_grid, src_size, trg_size)
    _, reference = upsample_then_match(src, trg, points, src_size, trg_size, dtype=torch.float64, return_cosine=True)
    fast = cosine_map(src, trg, points, src_size, trg_size)
    assert fast.shape == (len(points), *trg_size)
    assert (fast - reference).abs().max().item() < 1e-12


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("channels, src_grid, trg_grid, src_size, trg_size", CASES)
def test_predictions_equal_fp32_upsample_then_match_up_to_near_ties(seed, channels, src_grid, trg_grid, src_size, trg_size):
    src, trg, points = random_case(seed, channels, src_grid, trg_grid, src_size, trg_size)
    reference, reference_cos = upsample_then_match(src, trg, points, src_size, trg_size, return_cosine=True)
    fast = match_points(src, trg, points, src_size, trg_size)
    for i, ((fx, fy), (rx, ry)) in enumerate(zip(fast.tolist(), reference.tolist())):
        # Where the two disagree the fp32 reference must see a tie (within float error) between both pixels.
        assert abs(reference_cos[i, fy, fx].item() - reference_cos[i, ry, rx].item()) < 1e-5


def test_predictions_equal_the_reference_fixture_exactly():
    """spair_real: DiTF-protocol predictions of the reference code (spair_mini is covered through the
    harness in test_eval_spair.py)."""
    root = FIXTURES / "spair_real"
    expected = json.loads((root / "expected_pck.json").read_text())["pairs"]
    for name, pair_expected in expected.items():
        pair = json.loads((root / "PairAnnotation" / "test" / f"{name}.json").read_text())
        src = load_file(root / "features" / "aeroplane" / pair["src_imname"].replace(".jpg", ".safetensors"))["features"]
        trg = load_file(root / "features" / "aeroplane" / pair["trg_imname"].replace(".jpg", ".safetensors"))["features"]
        src_size, trg_size = tuple(pair["src_imsize"][1::-1]), tuple(pair["trg_imsize"][1::-1])
        points = torch.tensor(pair["src_kps"])
        assert match_points(src, trg, points, src_size, trg_size).tolist() == pair_expected["pred_trg_kps"], name
        assert upsample_then_match(src, trg, points, src_size, trg_size).tolist() == pair_expected["pred_trg_kps"], name


def test_interpolation_matrix_reproduces_torch_bilinear():
    for in_size, out_size in [(30, 375), (7, 23), (1, 5), (12, 8)]:
        signal = torch.randn(in_size, dtype=torch.float64)
        expected = F.interpolate(signal.view(1, 1, in_size, 1), size=(out_size, 1), mode="bilinear", align_corners=False)
        assert torch.allclose(interpolation_matrix(in_size, out_size) @ signal, expected.view(-1), atol=1e-14)


def test_squared_norms_and_point_vectors_equal_the_materialised_map():
    feats = torch.randn(16, 6, 9, dtype=torch.float64)
    size = (47, 61)
    upsampled = F.interpolate(feats[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(upsampled_sq_norms(feats, size), (upsampled**2).sum(0), rtol=1e-12)
    points = torch.tensor([[0, 0], [60, 46], [13, 29]])
    expected = upsampled[:, points[:, 1], points[:, 0]].T
    assert torch.allclose(upsampled_vectors(feats, size, points), expected, atol=1e-12)


def test_ties_go_to_the_first_pixel_in_row_major_order():
    constant = torch.ones(4, 3, 5)
    predictions = match_points(constant, constant, torch.tensor([[7, 9], [0, 0]]), (30, 50), (30, 50))
    assert predictions.tolist() == [[0, 0], [0, 0]]


def test_patch_matcher_returns_the_most_similar_cell():
    src = torch.zeros(3, 2, 2)
    src[0, 1, 0] = 1.0
    trg = torch.full((3, 4, 4), 0.1)
    trg[0, 2, 3] = 1.0
    assert match_points_lowres(src, trg, torch.tensor([[0, 1]])).tolist() == [[3, 2]]


def test_bad_inputs_are_named():
    feats = torch.randn(4, 3, 3)
    with pytest.raises(InvalidArgumentError, match="outside the 10x8"):
        match_points(feats, feats, torch.tensor([[10, 2]]), (8, 10), (8, 10))
    with pytest.raises(InvalidArgumentError, match="channels"):
        match_points(feats, torch.randn(5, 3, 3), torch.tensor([[1, 1]]), (8, 10), (8, 10))
    with pytest.raises(InvalidArgumentError, match=r"\(C, h, w\)"):
        match_points(feats[None], feats, torch.tensor([[1, 1]]), (8, 10), (8, 10))
    with pytest.raises(InvalidArgumentError, match="integer pixels"):
        match_points(feats, feats, torch.tensor([[1.5, 1.0]]), (8, 10), (8, 10))
