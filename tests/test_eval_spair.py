"""SPair-71k: loader quirks, the DiTF and GeoAware-SC protocols, prompts, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditf.cli import main
from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval import evaluate_spair
from ditf.eval.keypoints import Frame
from ditf.eval.metrics import correct_mask, point_errors
from ditf.eval.prompts import load_captions, prompt_for
from ditf.eval.spair import load_spair, parse_filters

FIXTURES = Path(__file__).parent / "fixtures"
MINI, REAL = FIXTURES / "spair_mini", FIXTURES / "spair_real"
SCORES = ("all_per_image", "all_per_point", "mean_per_image", "mean_per_point")


@pytest.fixture
def real_copy(tmp_path) -> Path:
    """A writable copy of spair_real to break in tests."""
    return Path(shutil.copytree(REAL, tmp_path / "SPair-71k"))


def edit_pair(root: Path, name: str, **fields) -> None:
    path = root / "PairAnnotation" / "test" / f"{name}.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


FIRST_REAL_PAIR = "000001-2008_002719-2008_004100:aeroplane"


def test_loader_keeps_the_real_annotation_quirks():
    dataset = load_spair(REAL)
    assert (len(dataset.pairs), dataset.categories) == (12, ["aeroplane"])
    pair = next(p for p in dataset.pairs if p.name == FIRST_REAL_PAIR)
    assert pair.source.size == (333, 500) and pair.target.size == (332, 500)  # [W, H, C] -> (H, W)
    assert pair.target_bbox == (36.0, 92.0, 500.0, 200.0)  # corner box touching the border
    assert pair.source_points.tolist() == [[212, 153], [300, 130], [330, 127]]
    assert pair.flags["truncation"] == 2 and pair.flags["viewpoint_variation"] == 0
    assert pair.source.key == "aeroplane/2008_002719"


def test_loader_selects_categories_filters_and_layouts():
    assert [len(load_spair(MINI, categories=[c]).pairs) for c in ("aeroplane", "dog")] == [12, 14]
    untruncated = load_spair(REAL, filters=parse_filters(["truncation=0,1"]))
    assert 0 < len(untruncated.pairs) < 12 and all(p.flags["truncation"] in (0, 1) for p in untruncated.pairs)
    assert [p.name for p in load_spair(MINI, layout="large").pairs] == [p.name for p in load_spair(MINI).pairs]
    with pytest.raises(DatasetError, match="Layout/small/test.txt"):
        load_spair(MINI, layout="small")
    with pytest.raises(InvalidArgumentError, match="available: \\['aeroplane', 'dog'\\]"):
        load_spair(MINI, categories=["cow"])
    with pytest.raises(InvalidArgumentError, match="valid flags"):
        load_spair(MINI, filters={"blur": {1}})
    with pytest.raises(InvalidArgumentError, match="FLAG=VALUE"):
        parse_filters(["truncation"])


def test_loader_names_what_is_missing_or_broken(tmp_path, real_copy):
    with pytest.raises(DatasetError, match=r"PairAnnotation/test.*SPair-71k.tar.gz"):
        load_spair(tmp_path)
    (real_copy / "JPEGImages" / "aeroplane" / "2008_004630.jpg").unlink()
    with pytest.raises(DatasetError, match="2008_004630.jpg does not exist"):
        load_spair(real_copy)


def test_loader_rejects_keypoints_outside_the_image_and_wrong_sizes(real_copy):
    edit_pair(real_copy, FIRST_REAL_PAIR, trg_kps=[[39, 145], [500, 171], [416, 173]])
    with pytest.raises(DatasetError, match=r"trg_kps \[\[500, 171\]\] lie outside the 500x332"):
        load_spair(real_copy)
    edit_pair(real_copy, FIRST_REAL_PAIR, trg_kps=[[39, 145], [364, 171], [416, 173]], src_imsize=[500, 300, 3])
    with pytest.raises(DatasetError, match="is 500x333 .* annotates it as 500x300"):
        load_spair(real_copy)


@pytest.mark.parametrize("fixture", [MINI, REAL], ids=["spair_mini", "spair_real"])
def test_scores_and_predictions_equal_the_reference_exactly(fixture):
    results = evaluate_spair(fixture, features=fixture / "features", progress=False)
    expected = json.loads((fixture / "expected_pck.json").read_text())
    assert {key: results[key] for key in SCORES} == {key: expected[key] for key in SCORES}
    for category, scores in expected["per_category"].items():
        ours = results["per_category"][category]
        assert {k: ours[k] for k in scores} == scores  # per_image, per_point, pairs
    predictions = {name: {k: pair[k] for k in ("pred_trg_kps", "correct", "total")} for name, pair in results["pairs"].items()}
    assert predictions == expected["pairs"]
    assert results["alpha"] == 0.1 and list(results["by_alpha"]) == ["0.05", "0.01"]
    by_alpha = results["by_alpha"]
    assert by_alpha["0.01"]["all_per_point"] <= by_alpha["0.05"]["all_per_point"] <= results["all_per_point"]
    assert results["protocol"]["name"] == "ditf" and results["protocol"]["rule"] == "<="


def test_image_threshold_scores_the_same_predictions_against_the_image_size():
    dataset = load_spair(REAL)
    results = evaluate_spair(REAL, features=REAL / "features", threshold="image", progress=False)
    expected = json.loads((REAL / "expected_pck.json").read_text())["pairs"]
    correct = total = 0
    for pair in dataset.pairs:
        errors = point_errors(np.array(expected[pair.name]["pred_trg_kps"]), pair.target_points)
        correct += int(correct_mask(errors, max(pair.target.size), 0.1, "<=").sum())
        total += pair.num_points
    assert results["all_per_point"] == 100 * correct / total
    assert results["protocol"]["threshold"] == "image"


def test_geoaware_frame_follows_its_keypoint_transform():
    frame = Frame.square_pad((333, 500), 840)  # (H, W)
    assert (frame.scale, frame.offset) == (1.68, (0.0, 140.0))  # new_h = round(559.44) = 559, (840 - 559) // 2
    assert Frame.square_pad((500, 375), 840).offset == (105.0, 0.0)
    points = np.array([[212.0, 153.0]])
    assert np.allclose(frame.from_frame(frame.to_frame(points)), points)


def write_square_case(root: Path) -> None:
    """One 40x30 pair whose 4x4 features (square, from the 64 px padded image) make the geometry
    predictable: keypoint A lands in the right cell, keypoint B one cell off."""
    for stem in ("src", "trg"):
        (root / "JPEGImages" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "cat" / f"{stem}.jpg")
    pair = {"src_imname": "src.jpg", "trg_imname": "trg.jpg", "src_imsize": [40, 30, 3], "trg_imsize": [40, 30, 3],
            "trg_bndbox": [0, 0, 40, 30], "category": "cat", "src_kps": [[5, 5], [30, 20]],
            "trg_kps": [[15, 10], [25, 14]]}
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    (root / "PairAnnotation" / "test" / "000001-src-trg:cat.json").write_text(json.dumps(pair))

    def one_hot(cells):  # channel k set at cell (row, col) of keypoint k, background channel elsewhere
        feats = torch.zeros(3, 4, 4)
        feats[2] = 1.0
        for k, (row, col) in enumerate(cells):
            feats[:, row, col] = 0.0
            feats[k, row, col] = 1.0
        return feats

    (root / "features" / "cat").mkdir(parents=True)
    # In the 64 px frame (scale 1.6, offset y 8): A (5, 5) -> (8, 16), cell (1, 0); B (30, 20) -> (48, 40), cell (2, 3).
    save_file({"features": one_hot([(1, 0), (2, 3)])}, root / "features" / "cat" / "src.safetensors")
    save_file({"features": one_hot([(1, 1), (2, 2)])}, root / "features" / "cat" / "trg.safetensors")


def test_geoaware_protocol_matches_cells_in_the_padded_frame(tmp_path):
    write_square_case(tmp_path)
    results = evaluate_spair(tmp_path, features=tmp_path / "features", protocol="geoaware", pad_size=64, progress=False)
    pair = results["pairs"]["000001-src-trg:cat"]
    # Cell centres (24, 24) and (40, 40) in the frame, back in original pixels: (15, 10) and (25, 20).
    assert pair["pred_trg_kps"] == [[15.0, 10.0], [25.0, 20.0]]
    # B is 6 px off in the original (9.6 frame px) > 0.1 * 40 * 1.6 = 6.4: one of two correct.
    assert (pair["correct"], results["all_per_point"]) == (1, 50.0)
    assert results["protocol"]["rule"] == "<" and results["protocol"]["pad_size"] == 64


def test_geoaware_protocol_rejects_non_square_feature_maps():
    with pytest.raises(DatasetError, match="h == w"):
        evaluate_spair(REAL, features=REAL / "features", protocol="geoaware", progress=False)


def test_prompts_follow_the_authors_caption_keys():
    captions = load_captions(REAL / "captions.json")
    assert prompt_for("2008_002719.jpg", "aeroplane", "caption", captions) == captions["aeroplane2008_002719.jpg"]
    assert prompt_for("2008_002719.jpg", "aeroplane", "class") == "a photo of a aeroplane"
    assert prompt_for("2008_002719.jpg", "aeroplane", "empty") == ""
    with pytest.raises(DatasetError, match="'aeroplane2008_004630.jpg' is not in the captions file"):
        prompt_for("2008_004630.jpg", "aeroplane", "caption", captions)


def test_cli_scores_spair_mini_and_writes_every_result_file(tmp_path, capsys):
    output = tmp_path / "out" / "results.json"
    code = main(["eval", "spair", "--root", str(MINI), "--features", str(MINI / "features"),
                 "--output", str(output), "--plot", "--plot-pairs", "2", "--quiet"])
    assert code == 0
    results = json.loads(output.read_text())
    expected = json.loads((MINI / "expected_pck.json").read_text())
    assert {key: results[key] for key in SCORES} == {key: expected[key] for key in SCORES}
    assert results["settings"]["features"] == str(MINI / "features") and results["ditf_version"]
    assert results == json.loads(json.dumps(evaluate_spair(MINI, features=MINI / "features", progress=False)))
    assert "| **all (pooled)** | 26 | 184 | 36.55 | 36.96 |" in output.with_suffix(".md").read_text()
    for suffix in ("_per_category.png", "_pairs.png"):
        with Image.open(output.with_name(f"results{suffix}")) as figure:
            assert figure.size[0] > 100
    assert "protocol card: ditf" in capsys.readouterr().out


def test_cli_needs_exactly_one_feature_source(capsys):
    assert main(["eval", "spair", "--root", str(MINI), "--quiet"]) == 2
    assert "exactly one of --features DIR" in capsys.readouterr().err


def test_cli_bad_feature_file_is_named_and_writes_no_results(tmp_path, capsys):
    features = Path(shutil.copytree(MINI / "features", tmp_path / "features"))
    save_file({"features": torch.zeros(24, 30, 40, dtype=torch.int64)}, features / "dog" / "2008_781244.safetensors")
    output = tmp_path / "results.json"
    code = main(["eval", "spair", "--root", str(MINI), "--features", str(features), "--output", str(output), "--quiet"])
    assert code == 2
    assert "2008_781244.safetensors: feature map has dtype I64; expected one of float16" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [features]


def test_cli_extracts_with_a_tiny_random_flux_model_end_to_end(flux_pipeline_dir, tmp_path):
    output = tmp_path / "results.json"
    argv = ["eval", "spair", "--root", str(REAL), "--model", str(flux_pipeline_dir), "--block", "21", "--t", "261",
            "--ensemble", "1", "--resolution", "128", "--dtype", "fp32", "--device", "cpu",
            "--cache", str(tmp_path / "cache"), "--output", str(output), "--quiet"]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["benchmark"]["pairs"] == 12 and len(results["pairs"]) == 12
    assert {k: results["settings"][k] for k in ("block", "t", "ensemble", "resolution", "variant", "prompt_mode")} == {
        "block": 21, "t": 261.0, "ensemble": 1, "resolution": 128, "variant": "ditf", "prompt_mode": "class"}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
