"""DiTF + DINOv2 fusion: the PCA and the fused maps by hand, then fused scoring of SPair, PF-Pascal and AP-10K
through the feature cache and the exact matcher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ditf.cli import main
from ditf.errors import InvalidArgumentError
from ditf.eval import evaluate_ap10k, evaluate_pfpascal, evaluate_spair
from ditf.eval.spair import load_spair
from ditf.features import FusionSettings, fuse
from ditf.features.fusion import co_pca, principal_axes
from ditf.matching.correspondence import upsample_then_match
from test_eval_ap10k import ap_tree  # noqa: F401  (fixture)
from test_eval_pfpascal import pf_tree  # noqa: F401  (fixture)

REAL = Path(__file__).parent / "fixtures" / "spair_real"
ROOT2 = math.sqrt(2)


# ------------------------------------------------------------------------------------ the maths by hand

def as_map(tokens: list[list[float]]) -> torch.Tensor:
    """Tokens (N, C) as a (C, 1, N) map: one row of N cells."""
    return torch.tensor(tokens, dtype=torch.float64).T[:, None, :]


# Four tokens, mean (5, -3): after centring (2, 2), (-2, -2), (1, -1), (-1, 1). Their scatter matrix is
# [[10, 6], [6, 10]]: axes (1, 1)/sqrt(2) (eigenvalue 16) and (1, -1)/sqrt(2) (eigenvalue 4), each signed so
# that its largest entry (the first, on a tie) is positive.
SOURCE = as_map([[7, -1], [3, -5]])
TARGET = as_map([[6, -4], [4, -2]])


def test_co_pca_projects_on_the_hand_computed_axes():
    source, target = co_pca(SOURCE, TARGET, dims=2)
    assert source.shape == (2, 1, 2) and target.shape == (2, 1, 2)
    # axis 1: (2, 2) -> 4 / sqrt(2) = 2 sqrt(2); axis 2: (1, -1) -> 2 / sqrt(2) = sqrt(2)
    torch.testing.assert_close(source[:, 0], torch.tensor([[2 * ROOT2, -2 * ROOT2], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(target[:, 0], torch.tensor([[0.0, 0.0], [ROOT2, -ROOT2]], dtype=torch.float64))
    one_source, one_target = co_pca(SOURCE, TARGET, dims=1)
    torch.testing.assert_close(one_source, source[:1])
    torch.testing.assert_close(one_target, target[:1])


def test_both_solvers_find_the_same_axes():
    # 4 tokens in 5 channels (N < C: the Gram-matrix path), and the same in 2 channels (the covariance path).
    padded_source = torch.cat([SOURCE, torch.zeros(3, 1, 2, dtype=torch.float64)])
    padded_target = torch.cat([TARGET, torch.zeros(3, 1, 2, dtype=torch.float64)])
    wide = co_pca(padded_source, padded_target, dims=2)
    narrow = co_pca(SOURCE, TARGET, dims=2)
    for a, b in zip(wide, narrow):
        torch.testing.assert_close(a, b)
    lowrank = co_pca(SOURCE, TARGET, dims=2, method="lowrank")  # exact on data of rank <= dims
    for a, b in zip(lowrank, narrow):
        torch.testing.assert_close(a, b)


def test_axes_beyond_the_rank_are_zero_and_signs_are_fixed():
    tokens = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], dtype=torch.float64)  # rank 1, 3 channels
    axes = principal_axes(tokens, 3)
    torch.testing.assert_close(axes[:, 0], torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64) / math.sqrt(5))
    assert torch.equal(axes[:, 2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(principal_axes(-tokens, 3)[:, 0], axes[:, 0])  # the sign does not follow the data


def test_fuse_by_hand_resizes_normalises_weights_and_concatenates():
    dino_source = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[4.0, 2.0], [0.0, -1.0]]])  # (2, 2, 2): a finer grid
    dino_target = torch.tensor([[[0.0, 5.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, -3.0]]])
    fused_source, fused_target = fuse(SOURCE.float(), TARGET.float(), dino_source, dino_target,
                                      weights=(2.0, 0.5), dims=(1, None))
    assert fused_source.shape == fused_target.shape == (3, 2, 2) and fused_source.dtype == torch.float32
    # DiTF part: PCA to 1 dim gives (2 sqrt 2, -2 sqrt 2) on a 1x2 grid; resized to 2x2 (rows repeat), normalised
    # per location (signs), times 2. The target's first component is 0: normalising a zero vector keeps it 0.
    torch.testing.assert_close(fused_source[0], torch.tensor([[2.0, -2.0], [2.0, -2.0]]))
    torch.testing.assert_close(fused_target[0], torch.zeros(2, 2))
    # DINOv2 part: kept whole, each location normalised, times 0.5.
    torch.testing.assert_close(fused_source[1:, 0, 0], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(fused_source[1:, 1, 1], torch.tensor([0.5, -0.5]) / ROOT2)
    torch.testing.assert_close(fused_target[1:, 0, 1], torch.tensor([0.5, 0.0]))


def test_fusion_is_deterministic_and_ignores_the_channel_order():
    generator = torch.Generator().manual_seed(0)
    ditf = [torch.randn(24, 6, 8, generator=generator), torch.randn(24, 5, 8, generator=generator)]
    dino = [torch.randn(12, 9, 12, generator=generator), torch.randn(12, 7, 12, generator=generator)]
    first = fuse(*ditf, *dino, dims=(6, 4))
    again = fuse(*ditf, *dino, dims=(6, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    order = torch.randperm(24, generator=generator)
    permuted = fuse(ditf[0][order], ditf[1][order], *dino, dims=(6, 4))
    for a, b in zip(first, permuted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert first[0].shape == (10, 9, 12) and first[1].shape == (10, 7, 12)  # the finer (DINOv2) grids
    assert fuse(*ditf, *dino, dims=(6, 4), grid="ditf")[0].shape == (10, 6, 8)


@pytest.mark.parametrize("changes, message", [
    ({"weights": (0, 0)}, r"weights=\(0, 0\).*not both 0"),
    ({"weights": (1.0, -1.0)}, r"finite numbers >= 0"),
    ({"dims": (0, None)}, r"dims=\(0, None\)"),
    ({"normalize": "never"}, r"normalize='never' is not one of after, before, both"),
    ({"grid": "coarser"}, r"grid='coarser'"),
    ({"pca": "svd"}, r"pca='svd'"),
])
def test_bad_fusion_settings_are_named(changes, message):
    with pytest.raises(InvalidArgumentError, match=message):
        FusionSettings(**changes)


def test_fuse_refuses_too_many_dims_and_mismatched_channels():
    with pytest.raises(InvalidArgumentError, match="PCA to 3 dimensions needs maps with at least 3 channels"):
        fuse(SOURCE, TARGET, SOURCE, TARGET, dims=(3, None))
    with pytest.raises(InvalidArgumentError, match="dino_src has 2 channels but dino_trg has 1"):
        fuse(SOURCE, TARGET, SOURCE, TARGET[:1], dims=(1, None))


# ------------------------------------------------------------------------ fused correspondence scoring

def fixture_map(stem: str) -> torch.Tensor:
    return load_file(REAL / "features" / "aeroplane" / f"{stem}.safetensors")["features"]


def dino_map(stem: str) -> torch.Tensor:
    """A stand-in DINOv2 map: 16 of the fixture's channels on a finer grid, with a little fixed noise."""
    base = F.interpolate(fixture_map(stem)[None, 16:32], size=(40, 60), mode="bilinear", align_corners=False)[0]
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(int(stem.replace("_", ""))))
    return base + 0.05 * noise


class Served:
    """An extractor serving precomputed maps by image stem, counting its calls."""

    prompt_mode = "empty"

    def __init__(self, name: str, maps):
        self.name, self.maps, self.calls = name, maps, 0

    def describe(self) -> dict:
        return {"extractor": self.name}

    def __call__(self, image_path: Path, prompt: str) -> torch.Tensor:
        self.calls += 1
        return self.maps(image_path.stem)


FUSION = {"dims": (16, None), "weights": (1.0, 0.7)}


def test_fused_spair_matches_a_hand_fusion_through_the_cache_and_the_exact_matcher(tmp_path):
    ditf, dino = Served("ditf-fixture", fixture_map), Served("dino-fixture", dino_map)
    results = evaluate_spair(REAL, extractor=ditf, fuse=dino, fusion=FUSION, cache_dir=tmp_path, progress=False)
    assert (ditf.calls, dino.calls) == (4, 4)
    settings = FusionSettings(**FUSION)
    assert results["settings"]["fusion"]["dims"] == [16, None] and results["settings"]["fusion"]["weights"] == [1.0, 0.7]
    assert results["settings"]["fusion"]["dino"]["extractor"] == "dino-fixture"
    assert "co_pca" in results["protocol"]["fusion"]["reference"]
    assert "unpublished" in results["protocol"]["fusion"]
    for pair in load_spair(REAL).pairs:
        source, target = fuse(fixture_map(pair.source.stem), fixture_map(pair.target.stem),
                              dino_map(pair.source.stem), dino_map(pair.target.stem),
                              weights=settings.weights, dims=settings.dims)
        points = torch.from_numpy(np.floor(pair.source_points).astype(np.int64))
        expected = upsample_then_match(source, target, points, pair.source.size, pair.target.size, dtype=torch.float64)
        assert results["pairs"][pair.name]["pred_trg_kps"] == expected.tolist(), pair.name
    again_ditf, again_dino = Served("ditf-fixture", fixture_map), Served("dino-fixture", dino_map)
    again = evaluate_spair(REAL, extractor=again_ditf, fuse=again_dino, fusion=FUSION, cache_dir=tmp_path,
                           progress=False)
    assert (again_ditf.calls, again_dino.calls) == (0, 0)  # both sides served from the cache
    assert again["pairs"] == results["pairs"]
    unfused = evaluate_spair(REAL, extractor=again_ditf, cache_dir=tmp_path, progress=False)
    assert "fusion" not in unfused["settings"] and unfused["pairs"] != results["pairs"]


def test_fused_scoring_in_worker_processes_agrees(tmp_path):
    dino = tmp_path / "dino" / "aeroplane"
    dino.mkdir(parents=True)
    for path in (REAL / "features" / "aeroplane").iterdir():
        save_file({"features": dino_map(path.stem).contiguous()}, dino / path.name)
    here = evaluate_spair(REAL, features=REAL / "features", fuse_features=dino.parent, fusion=FUSION, progress=False)
    spread = evaluate_spair(REAL, features=REAL / "features", fuse_features=dino.parent, fusion=FUSION, workers=2,
                            progress=False)
    assert spread["pairs"] == here["pairs"]
    assert here["settings"]["fusion"]["dino"] == {"source": "features folder", "features": str(dino.parent)}


def test_fusion_needs_a_dino_source_and_the_right_name(tmp_path):
    with pytest.raises(InvalidArgumentError, match="fusion settings were given without fuse="):
        evaluate_spair(REAL, features=REAL / "features", fusion=FUSION, progress=False)
    with pytest.raises(InvalidArgumentError, match="fuse='dinov3' is not a DINOv2 baseline; use one of dinov2-b14"):
        evaluate_spair(REAL, features=REAL / "features", fuse="dinov3", progress=False)


WHOLE = {"dims": (None, None)}
"""Maps fused with themselves and kept whole: one-hot maps stay one-hot in both halves, so predictions hold."""


def test_pfpascal_scores_fused_features(pf_tree):
    root, features = pf_tree
    plain = evaluate_pfpascal(root, features=features, progress=False)
    fused = evaluate_pfpascal(root, features=features, fuse_features=features, fusion=WHOLE, progress=False)
    assert fused["pairs"] == plain["pairs"] and fused["all_per_point"] == plain["all_per_point"]
    assert fused["settings"]["fusion"]["dims"] == [None, None]


def test_ap10k_scores_fused_features(ap_tree):
    root, features = ap_tree
    plain = evaluate_ap10k(root, features=features, subset="cross-family", progress=False)
    fused = evaluate_ap10k(root, features=features, subset="cross-family", fuse_features=features, fusion=WHOLE,
                           progress=False)
    assert fused["pairs"] == plain["pairs"] and fused["all_per_point"] == plain["all_per_point"]
    assert fused["settings"]["fusion"]["dims"] == [None, None]


def test_cli_fuses_and_prints_the_fusion_card(tmp_path, capsys):
    output = tmp_path / "fused.json"
    code = main(["eval", "spair", "--root", str(REAL), "--features", str(REAL / "features"), "--fuse-features",
                 str(REAL / "features"), "--fuse-dims", "8", "none", "--fuse-weights", "1", "0.5", "--quiet",
                 "-o", str(output)])
    assert code == 0
    results = json.loads(output.read_text())
    assert results["settings"]["fusion"]["dims"] == [8, None] and results["settings"]["fusion"]["weights"] == [1.0, 0.5]
    printed = capsys.readouterr().out
    assert "fusion pca" in printed and "DiTF reduced to 8 principal components" in printed
    assert "fusion" in output.with_suffix(".md").read_text()
