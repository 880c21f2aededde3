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
    auto_precision,
    cosine_map,
    cosine_map_prepared,
    float32_error_map,
    interpolation_matrix,
    match_points,
    match_points_lowres,
    match_prepared,
    prepare_target,
    upsample_then_match,
    upsampled_sq_norms,
    upsampled_vectors,
)
from ditf.matching.float32_error import TF32_UNIT_ROUNDOFF, float32_matmul_input_roundoff

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


def reference_fixture_pairs():
    """spair_real pairs as (name, src, trg, points, src_size, trg_size, expected predictions)."""
    root = FIXTURES / "spair_real"
    expected = json.loads((root / "expected_pck.json").read_text())["pairs"]
    for name, pair_expected in expected.items():
        pair = json.loads((root / "PairAnnotation" / "test" / f"{name}.json").read_text())
        src = load_file(root / "features" / "aeroplane" / pair["src_imname"].replace(".jpg", ".safetensors"))["features"]
        trg = load_file(root / "features" / "aeroplane" / pair["trg_imname"].replace(".jpg", ".safetensors"))["features"]
        src_size, trg_size = tuple(pair["src_imsize"][1::-1]), tuple(pair["trg_imsize"][1::-1])
        yield name, src, trg, torch.tensor(pair["src_kps"]), src_size, trg_size, pair_expected["pred_trg_kps"]


def test_predictions_equal_the_reference_fixture_exactly():
    """spair_real: DiTF-protocol predictions of the reference code (spair_mini is covered through the
    harness in test_eval_spair.py)."""
    for name, src, trg, points, src_size, trg_size, expected in reference_fixture_pairs():
        assert match_points(src, trg, points, src_size, trg_size, precision="float64").tolist() == expected, name
        assert upsample_then_match(src, trg, points, src_size, trg_size).tolist() == expected, name


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


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_ties_go_to_the_first_pixel_in_row_major_order(precision):
    constant = torch.ones(4, 3, 5)
    points = torch.tensor([[7, 9], [0, 0]])
    predictions = match_points(constant, constant, points, (30, 50), (30, 50), precision=precision)
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
    with pytest.raises(InvalidArgumentError, match="'auto', 'float32' or 'float64', got 'fp16'"):
        match_points(feats, feats, torch.tensor([[1, 1]]), (8, 10), (8, 10), precision="fp16")
    with pytest.raises(InvalidArgumentError, match="'mps' has no float64"):
        prepare_target(feats, (8, 10), device="mps")


# float32 maps with a float64 re-check of near-ties (precision="float32")

PRECISION_CASES = CASES + [(1024, (30, 40), (24, 32), (375, 500), (333, 500))]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("channels, src_grid, trg_grid, src_size, trg_size", PRECISION_CASES)
def test_float32_with_recheck_predicts_exactly_the_float64_pixels(seed, channels, src_grid, trg_grid, src_size, trg_size):
    src, trg, points = random_case(seed, channels, src_grid, trg_grid, src_size, trg_size, num_points=12)
    target = prepare_target(trg, trg_size)
    vectors = upsampled_vectors(src, src_size, points)
    reference = match_prepared(vectors, target, precision="float64")
    assert torch.equal(match_prepared(vectors, target, precision="float32"), reference)


def test_float32_recheck_reproduces_the_reference_fixture():
    for name, src, trg, points, src_size, trg_size, expected in reference_fixture_pairs():
        assert match_points(src, trg, points, src_size, trg_size, precision="float32").tolist() == expected, name


def mirrored_tie_case(seed: int, swap: bool, channels: int = 1024):
    """A 6x8 map upsampled 16x to 96x128 whose right half is its left half with channel pairs swapped
    (or the reverse), and a source vector symmetric in each pair: pixels 64 px apart have the same
    exact cosine, but float32 sums the swapped channels in another order and separates them."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randn(channels, 6, 4, generator=generator)
    swapped = half[torch.arange(channels).view(-1, 2).flip(1).flatten()]
    trg = torch.cat([swapped, half] if swap else [half, swapped], dim=2)
    src = (half[:, 2, 1] + swapped[:, 2, 1])[None] / 2
    return src, prepare_target(trg, (96, 128))


def test_float32_recheck_resolves_ties_that_plain_float32_gets_wrong():
    fooled = 0
    for seed in range(3):
        for swap in (False, True):
            src, target = mirrored_tie_case(seed, swap)
            reference = match_prepared(src, target, precision="float64")
            ((x, y),) = reference.tolist()
            cos64 = cosine_map_prepared(src, target)[0]
            assert x < 64 and cos64[y, x].float() == cos64[y, x + 64].float()  # a tie, won by the first pixel
            cos32 = cosine_map_prepared(src, target, precision="float32")[0]
            plain_y, plain_x = torch.unravel_index(cos32.argmax(), (96, 128))
            fooled += (plain_x.item(), plain_y.item()) == (x + 64, y)
            assert torch.equal(match_prepared(src, target, precision="float32"), reference)
    assert fooled > 0, "plain float32 never picked the mirrored pixel: the case would not catch a missing re-check"


def checkerboard_case(seed: int, channels: int = 256):
    """Neighbouring cells are +v and -v plus 1e-4 noise, so upsampled pixels between them nearly
    cancel: there float32 cosines are least accurate and the error bound is widest."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(channels, generator=generator)
    sign = (torch.arange(8)[:, None] + torch.arange(10)[None]) % 2 * 2 - 1
    trg = base[:, None, None] * sign + 1e-4 * torch.randn(channels, 8, 10, generator=generator)
    src = torch.cat([(trg[:, 3, 4] + trg[:, 3, 5])[None], torch.randn(4, channels, generator=generator)])
    return src, prepare_target(trg, (64, 80))


def test_float32_recheck_is_exact_where_neighbouring_cells_cancel():
    for seed in range(3):
        src, target = checkerboard_case(seed)
        assert target.norm_ratio.max() > 10
        reference = match_prepared(src, target, precision="float64")
        assert torch.equal(match_prepared(src, target, precision="float32"), reference)


def test_float32_cosines_stay_within_the_error_bound():
    src, trg, points = random_case(0, 1024, (30, 40), (24, 32), (375, 500), (333, 500))
    random_maps = (upsampled_vectors(src, (375, 500), points), prepare_target(trg, (333, 500)))
    for vectors, target in [random_maps, checkerboard_case(0)]:
        cos32 = cosine_map_prepared(vectors, target, precision="float32")
        error = (cos32 - cosine_map_prepared(vectors, target)).abs()
        assert bool((error <= float32_error_map(target)).all())


def test_error_bound_widens_when_float32_matmuls_may_use_tf32():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert float32_matmul_input_roundoff(torch.device("cpu")) == TF32_UNIT_ROUNDOFF
    finally:
        torch.set_float32_matmul_precision(saved)
    assert float32_matmul_input_roundoff(torch.device("cpu")) == 2.0**-24


def test_tables_live_on_the_requested_device():
    src, trg, points = random_case(0, 8, (5, 7), (6, 4), (41, 23), (37, 52))
    target = prepare_target(trg, (37, 52), device="cpu")
    tables = (target.feats, target.rows, target.cols, target.inv_norm, target.norm_ratio)
    assert {table.device.type for table in tables} == {"cpu"}
    assert target.inv_norm.dtype == torch.float64
    predictions = match_points(src, trg, points, (41, 23), (37, 52), device="cpu")
    assert predictions.device.type == "cpu"
    assert torch.equal(predictions, match_points(src, trg, points, (41, 23), (37, 52), precision="float64"))


@pytest.mark.parametrize(
    "capability, expected",
    [((8, 0), "float64"), ((9, 0), "float64"), ((8, 6), "float32"), ((8, 9), "float32"), ((12, 0), "float32")],
)
def test_auto_precision_is_float64_on_cpu_and_on_gpus_fast_at_it(monkeypatch, capability, expected):
    assert auto_precision("cpu") == "float64"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    assert auto_precision("cuda:0") == expected
