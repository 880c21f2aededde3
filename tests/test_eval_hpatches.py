"""HPatches homography estimation: DIFT's protocol against its own results, the maths by hand, the loader's errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.homography import (
    estimate_homography,
    homography_accuracy,
    mean_corner_error,
    mutual_nearest_neighbours,
    sample_descriptors,
)
from ditf.eval.hpatches import (
    HPatchesSubsetWarning,
    hpatches_feature_folder,
    keypoints_for,
    load_hpatches,
    read_keypoints,
    score_hpatches,
)
from ditf.eval.hpatches_dataset import HIGH_RESOLUTION_SEQUENCES, STANDARD_SEQUENCES
from ditf.eval.hpatches_keypoints import grid_keypoints, sift_keypoints

FIXTURE = Path(__file__).parent / "fixtures" / "hpatches_mini"
FEATURES = FIXTURE / "features"
KEYPOINTS = FIXTURE / "keypoints"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
IMAGE_SIZE = (180, 240)  # (H, W) of every image of the shared fixture, which the copy leaves out

pytestmark = pytest.mark.filterwarnings("ignore::ditf.eval.hpatches_dataset.HPatchesSubsetWarning")


def paint_image(path: Path, seed: int) -> None:
    """A 240x180 PPM of random grey-level blocks: flat regions and sharp corners, which SIFT finds."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 1), dtype=np.uint8).repeat(3, axis=2)
    Image.fromarray(blocks).resize(IMAGE_SIZE[::-1], Image.NEAREST).save(path)


def copy_tree(destination: Path, sequences: list[str] | None = None) -> Path:
    """The fixture's release folder (H_1_k files) with painted images 1.ppm..6.ppm, under `destination`."""
    source = FIXTURE / "hpatches-sequences-release"
    root = destination / "hpatches-sequences-release"
    for folder in sorted(source.iterdir()):
        if sequences is None or folder.name in sequences:
            shutil.copytree(folder, root / folder.name)
            for index in range(1, 7):
                paint_image(root / folder.name / f"{index}.ppm", seed=index)
    return root


@pytest.fixture(scope="module")
def hpatches_root(tmp_path_factory) -> Path:
    return copy_tree(tmp_path_factory.mktemp("hpatches"))


# ------------------------------------------------------------------------- DIFT's own results


@pytest.mark.parametrize("mode", ["lmeds", "ransac"])
def test_fixture_reproduces_dift_reference(hpatches_root, mode):
    results = score_hpatches(
        load_hpatches(hpatches_root), hpatches_feature_folder(FEATURES), keypoints=KEYPOINTS, mode=mode, progress=False
    )
    expected = EXPECTED[mode]
    assert results["per_pair"].keys() == expected["per_pair"].keys()
    for name, pair in expected["per_pair"].items():
        assert results["per_pair"][name]["matches"] == pair["matches"], name
        assert results["per_pair"][name]["mean_corner_error"] == pytest.approx(pair["mean_corner_error"], abs=0.02), name
    for group in ("overall", "i", "v", "thresholds"):
        assert results[group] == expected[group], group
    assert results["benchmark"] | {"root": None} == {
        "name": "HPatches", "root": None, "sequences": 4, "i_sequences": 2, "v_sequences": 2, "pairs": 20,
        "standard": False,
    }
    assert results["protocol"]["mode"] == mode
    assert "Tsingularity/dift" in results["protocol"]["reference"]
    json.dumps(results, allow_nan=False)


def test_builtin_grid_keypoints_run_end_to_end(hpatches_root):
    results = score_hpatches(
        load_hpatches(hpatches_root, ["v_case21_3"]), hpatches_feature_folder(FEATURES), keypoints="grid", progress=False
    )
    assert list(results["per_pair"]) == [f"v_case21_3/{k}" for k in range(2, 7)]
    assert all(pair["matches"] > 4 for pair in results["per_pair"].values())
    assert results["i"] is None and results["overall"] == results["v"]
    assert "grid" in results["protocol"]["description"]["keypoints"]


def test_pairs_without_a_homography_count_as_wrong(hpatches_root):
    def constant_features(sequence: str, index: int, image_path: Path) -> torch.Tensor:
        return torch.ones(4, 3, 3)  # every descriptor alike: one mutual match, too few for a homography

    results = score_hpatches(
        load_hpatches(hpatches_root, ["i_case21_0"]), constant_features, keypoints=KEYPOINTS, progress=False
    )
    assert {pair["mean_corner_error"] for pair in results["per_pair"].values()} == {None}
    assert {pair["matches"] for pair in results["per_pair"].values()} == {1}
    assert results["overall"] == [0.0, 0.0, 0.0]


def test_unknown_mode_is_refused(hpatches_root):
    with pytest.raises(InvalidArgumentError, match="'magsac'"):
        score_hpatches(load_hpatches(hpatches_root), hpatches_feature_folder(FEATURES), mode="magsac")


# ------------------------------------------------------------------------- the maths by hand


def test_descriptor_sampling_puts_pixel_0_on_the_map_edge():
    height, width = 9, 9  # image pixels 0..8; c = (4, 4)
    columns = torch.arange(4, dtype=torch.float32) + 1  # map value = column + 1, so zero padding shows
    ramp = columns.expand(4, 4)[None]  # (1, 4, 4)
    points = np.array([[4, 4], [0, 4], [8, 4], [2, 4]], dtype=np.float32)
    sampled = sample_descriptors(ramp, points, (height, width))[:, 0]
    # x -> map column x * w / (W - 1) - 0.5: the centre lands between columns 1 and 2 (value 2.5);
    # pixel 0 on the left edge, half zero padding (0.5 * 1); pixel 8 on the right edge (0.5 * 4).
    assert sampled.tolist() == [2.5, 0.5, 2.0, 1.5]


def bilinear_with_zero_padding(features: np.ndarray, u: float, v: float) -> np.ndarray:
    """Value of a (C, h, w) map at column u, row v (cell centres at integers), zero outside."""
    _, h, w = features.shape
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    value = np.zeros(features.shape[0])
    for row, weight_v in ((v0, v0 + 1 - v), (v0 + 1, v - v0)):
        for column, weight_u in ((u0, u0 + 1 - u), (u0 + 1, u - u0)):
            if 0 <= row < h and 0 <= column < w:
                value += weight_v * weight_u * features[:, row, column]
    return value


def test_descriptor_sampling_matches_a_hand_computation():
    features = torch.randn(5, 6, 8, generator=torch.Generator().manual_seed(0))
    height, width = 30, 41
    points = np.array([[0, 0], [40, 29], [13.5, 7.25], [20, 14.5], [3, 28]], dtype=np.float32)
    sampled = sample_descriptors(features, points, (height, width)).numpy()
    for (x, y), descriptor in zip(points, sampled):
        u, v = x * 8 / (width - 1) - 0.5, y * 6 / (height - 1) - 0.5
        np.testing.assert_allclose(descriptor, bilinear_with_zero_padding(features.numpy(), u, v), atol=1e-5)


def test_descriptor_sampling_is_not_upsample_then_index_except_at_the_centre():
    features = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    height, width = 21, 29  # odd, so the centre (14, 10) is a pixel
    upsampled = F.interpolate(features[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    centre, off_centre = np.array([[14, 10]], np.float32), np.array([[5, 3]], np.float32)
    assert torch.allclose(sample_descriptors(features, centre, (height, width))[0], upsampled[:, 10, 14], atol=1e-5)
    # (kp - c) / c stretches the map over [0, W - 1] while upsampling spreads it over [-0.5, W - 0.5].
    assert not torch.allclose(sample_descriptors(features, off_centre, (height, width))[0], upsampled[:, 3, 5], atol=1e-3)


def test_mutual_nearest_neighbours_by_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 0.1], [-1.0, 0.0]])  # lengths do not matter, directions do
    # a0 <-> b1 and a1 <-> b0 are mutual; a2's nearest is b1, whose nearest is a0.
    assert mutual_nearest_neighbours(a, b).tolist() == [[0, 1], [1, 0]]
    assert mutual_nearest_neighbours(a, b[:0]).shape == (0, 2)


def test_corner_error_of_the_identity_and_of_a_shift():
    identity = np.eye(3)
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    assert mean_corner_error(identity, identity, (180, 240)) == 0.0
    assert mean_corner_error(shift, identity, (180, 240)) == pytest.approx(5.0)


def test_homography_is_recovered_from_exact_matches():
    truth = np.array([[1.02, 0.05, 3.0], [-0.03, 0.98, -2.0], [1e-4, -5e-5, 1.0]])
    points = np.random.default_rng(0).uniform(0, 200, size=(30, 2))
    warped = points @ truth[:, :2].T + truth[:, 2]
    warped = warped[:, :2] / warped[:, 2:]
    for method in ("lmeds", "ransac"):
        assert mean_corner_error(estimate_homography(points, warped, method), truth, (180, 240)) < 0.01
    assert estimate_homography(points[:3], warped[:3]) is None  # fewer than 4 matches
    line = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    assert estimate_homography(line, line + 1) is None  # degenerate: OpenCV finds none


def test_accuracy_splits_illumination_and_viewpoint():
    errors = {"i_a/2": 0.5, "i_a/3": 2.0, "v_b/2": 4.0, "v_b/3": None}
    assert homography_accuracy(errors) == {
        "overall": [25.0, 50.0, 75.0],
        "i": [50.0, 100.0, 100.0],
        "v": [0.0, 0.0, 50.0],
        "thresholds": [1.0, 3.0, 5.0],
    }
    with pytest.raises(InvalidArgumentError, match="'x_c/2'"):
        homography_accuracy({"x_c/2": 1.0})


# ------------------------------------------------------------------------- loader and inputs


def test_standard_sequences_are_the_108_of_dift_and_d2net():
    assert len(STANDARD_SEQUENCES) == 108 == len(set(STANDARD_SEQUENCES))
    assert sum(name.startswith("i_") for name in STANDARD_SEQUENCES) == 52
    assert sum(name.startswith("v_") for name in STANDARD_SEQUENCES) == 56
    assert not set(HIGH_RESOLUTION_SEQUENCES) & set(STANDARD_SEQUENCES) and len(HIGH_RESOLUTION_SEQUENCES) == 8


def test_loader_reads_pairs_sizes_and_homographies(hpatches_root):
    with pytest.warns(HPatchesSubsetWarning, match="not the 108"):
        dataset = load_hpatches(hpatches_root.parent)  # the parent of the release folder works too
    assert [sequence.name for sequence in dataset.sequences] == ["i_case21_0", "i_case21_2", "v_case21_1", "v_case21_3"]
    pair = dataset.pairs[7]
    assert pair.name == "i_case21_2/4" and pair.reference.index == 1 and pair.target.size == IMAGE_SIZE
    np.testing.assert_array_equal(pair.homography, np.loadtxt(hpatches_root / "i_case21_2" / "H_1_4"))


def test_high_resolution_sequences_are_left_out(tmp_path):
    root = copy_tree(tmp_path, ["v_case21_1"])
    shutil.copytree(root / "v_case21_1", root / "v_talent")
    with pytest.warns(HPatchesSubsetWarning, match="v_talent"):
        dataset = load_hpatches(root)
    assert [sequence.name for sequence in dataset.sequences] == ["v_case21_1"]


def test_missing_root_names_it_and_where_hpatches_comes_from(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*hpatches-sequences-release\.tar\.gz"):
        load_hpatches(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no i_\\*/v_\\* sequence folders"):
        load_hpatches(tmp_path)


def test_missing_homography_and_image_are_named(tmp_path):
    root = copy_tree(tmp_path, ["i_case21_0"])
    (root / "i_case21_0" / "H_1_4").unlink()
    (root / "i_case21_0" / "5.ppm").unlink()
    with pytest.raises(DatasetError, match=r"i_case21_0/5\.ppm, i_case21_0/H_1_4"):
        load_hpatches(root)


def test_partial_tree_fails_only_when_the_full_set_is_required(hpatches_root):
    with pytest.raises(DatasetError, match="lacks 108 of the 108 standard sequences: i_ajuntament"):
        load_hpatches(hpatches_root, require_all=True)
    with pytest.raises(DatasetError, match="no sequence folder i_nope"):
        load_hpatches(hpatches_root, ["i_nope"])


def test_keypoint_file_with_three_columns_is_named(tmp_path):
    path = tmp_path / "i_case21_0-1.kp"
    path.write_text("10 20 0.9\n30 40 0.8\n")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*3 columns"):
        read_keypoints(path)
    assert read_keypoints(KEYPOINTS / "i_case21_0-1.kp").shape == (67, 2)


def test_missing_keypoint_file_points_to_the_superpoint_download(hpatches_root, tmp_path):
    image = load_hpatches(hpatches_root, ["i_case21_0"]).sequences[0].images[0]
    with pytest.raises(DatasetError, match=r"i_case21_0-1\.kp does not exist.*superpoint-1k"):
        keypoints_for(tmp_path, image)


def test_features_with_different_channels_name_both_files(hpatches_root, tmp_path):
    shutil.copytree(FEATURES / "v_case21_1", tmp_path / "v_case21_1")
    narrow = tmp_path / "v_case21_1" / "3.safetensors"
    save_file({"features": load_file(narrow)["features"][:16].contiguous()}, narrow)
    dataset = load_hpatches(hpatches_root, ["v_case21_1"])
    reference = re.escape(str(tmp_path / "v_case21_1" / "1.safetensors"))
    with pytest.raises(DatasetError, match=f"{reference}: 32 channels, but {re.escape(str(narrow))}: 16"):
        score_hpatches(dataset, hpatches_feature_folder(tmp_path), keypoints=KEYPOINTS, progress=False)


def test_missing_feature_file_is_named(hpatches_root, tmp_path):
    dataset = load_hpatches(hpatches_root, ["v_case21_1"])
    expected = re.escape(str(tmp_path / "v_case21_1" / "1.safetensors"))
    with pytest.raises(DatasetError, match=f"{expected} does not exist"):
        score_hpatches(dataset, hpatches_feature_folder(tmp_path), keypoints=KEYPOINTS, progress=False)


def test_builtin_keypoints_lie_inside_the_image(hpatches_root):
    image = load_hpatches(hpatches_root, ["i_case21_0"]).sequences[0].images[0]
    for points in (sift_keypoints(image.path), keypoints_for("sift", image), grid_keypoints(image.size)):
        assert points.ndim == 2 and points.shape[1] == 2 and len(points) > 50
        assert (points >= 0).all() and (points[:, 0] < 240).all() and (points[:, 1] < 180).all()
    assert len(keypoints_for("sift", image)) <= 1000
    assert len(keypoints_for("grid", image)) == 30 * 22  # x = 4, 12, .., 236; y = 4, 12, .., 172
