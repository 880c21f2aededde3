"""AP-10K in GeoAware-SC's pair format: a small tree in the real layout, three subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditf.cli import main
from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.ap10k import load_ap10k
from ditf.eval import evaluate_ap10k

# 90x60 images, 6x4 feature grids (stride 15): cell (row, col) is centred on pixel (15 col + 7, 15 row + 7).
GRID, WIDTH, HEIGHT, KEYPOINTS = (4, 6), 90, 60, 17

# image id -> (family, species, {keypoint index: annotated cell}, bbox [x, y, w, h])
IMAGES = {
    1: ("canidae", "dog", {0: (1, 1), 1: (1, 2), 2: (2, 3)}, [10, 10, 60, 40]),
    2: ("canidae", "dog", {0: (2, 1), 2: (1, 4)}, [5, 5, 80, 40]),  # keypoint 1 not visible
    3: ("canidae", "wolf", {0: (1, 2), 1: (2, 2)}, [10, 10, 60, 40]),
    4: ("felidae", "cat", {0: (1, 1), 1: (1, 3), 2: (2, 4)}, [10, 10, 60, 40]),
}
# Image 2's features put keypoint 2 one cell below its annotation: every match into it is 15 px off there.
FEATURE_CELLS = {**{i: cells for i, (_, _, cells, _) in IMAGES.items()}, 2: {0: (2, 1), 2: (2, 4)}}
PAIRS = {"test": (1, 2, "dog"), "test_cross_species": (1, 3, "canidae"), "test_cross_family": (4, 2, "all")}


def stem(image_id: int) -> str:
    return f"{image_id:012d}"


def centre(row: int, col: int) -> list[int]:
    return [15 * col + 7, 15 * row + 7]


@pytest.fixture
def ap_tree(tmp_path) -> tuple[Path, Path]:
    """(dataset root, features folder)."""
    root, features = tmp_path / "ap-10k", tmp_path / "features"
    for image_id, (family, species, cells, bbox) in IMAGES.items():
        for folder in ("ImageAnnotation", "JPEGImages"):
            (root / folder / family / species).mkdir(parents=True, exist_ok=True)
        keypoints = [0] * (3 * KEYPOINTS)
        for k, cell in cells.items():
            keypoints[3 * k : 3 * k + 3] = [*centre(*cell), 2]
        annotation = {"id": image_id, "image_id": image_id, "keypoints": keypoints, "bbox": bbox, "width": WIDTH,
                      "height": HEIGHT, "name": species, "supercategory": family, "file_name": f"{stem(image_id)}.jpg"}
        (root / "ImageAnnotation" / family / species / f"{stem(image_id)}.json").write_text(json.dumps(annotation))
        Image.new("RGB", (WIDTH, HEIGHT)).save(root / "JPEGImages" / family / species / f"{stem(image_id)}.jpg")
        feats = torch.zeros(KEYPOINTS + 1, *GRID)
        feats[-1] = 1.0  # background channel
        for k, (row, col) in FEATURE_CELLS[image_id].items():
            feats[:, row, col] = 0.0
            feats[k, row, col] = 1.0
        (features / species).mkdir(parents=True, exist_ok=True)
        save_file({"features": feats}, features / species / f"{stem(image_id)}.safetensors")
    for folder, (src, trg, category) in PAIRS.items():
        (root / "PairAnnotation" / folder).mkdir(parents=True)
        paths = {}
        for key, image_id in (("src_json_path", src), ("trg_json_path", trg)):
            family, species = IMAGES[image_id][:2]
            paths[key] = f"data/ap-10k/ImageAnnotation/{family}/{species}/{stem(image_id)}.json"
        (root / "PairAnnotation" / folder / f"{stem(src)}-{stem(trg)}:{category}.json").write_text(json.dumps(paths))
    return root, features


def test_subsets_read_their_pair_folders_with_mutually_visible_keypoints(ap_tree):
    root, _ = ap_tree
    intra = load_ap10k(root, "intra-species")
    assert intra.categories == ["dog"] and intra.subset == "intra-species"
    pair = intra.pairs[0]
    assert pair.source_points.tolist() == [centre(1, 1), centre(2, 3)]  # keypoint 1 is hidden in the target
    assert pair.target_points.tolist() == [centre(2, 1), centre(1, 4)]
    assert pair.target_bbox == (5.0, 5.0, 85.0, 45.0)  # [x, y, w, h] -> corners
    assert (pair.source.group, pair.source.size) == ("dog", (HEIGHT, WIDTH))
    assert load_ap10k(root, "cross-species").categories == ["canidae"]
    assert load_ap10k(root, "cross-family").pairs[0].source.group == "cat"


def test_scores_use_the_target_box_max_side(ap_tree):
    root, features = ap_tree
    dataset = load_ap10k(root, "intra-species")
    results = evaluate_ap10k(root, features=features, subset="intra-species", progress=False)
    pair = results["pairs"][dataset.pairs[0].name]
    assert pair["pred_trg_kps"] == [centre(2, 1), centre(2, 4)]
    # 15 px off for keypoint 2 against 0.1 * 80 = 8 px: one of two correct.
    assert (pair["correct"], pair["total"], results["all_per_point"]) == (1, 2, 50.0)
    assert results["by_alpha"]["0.01"]["all_per_point"] == 50.0  # the exact match passes every alpha


def test_loader_names_what_is_missing_or_malformed(ap_tree, tmp_path):
    root, _ = ap_tree
    with pytest.raises(InvalidArgumentError, match="trn exists for intra-species only"):
        load_ap10k(root, "cross-family", split="trn")
    with pytest.raises(DatasetError, match="PairAnnotation/val_cross_species.*prepare_ap10k"):
        load_ap10k(root, "cross-species", split="val")
    pair_file = next((root / "PairAnnotation" / "test").glob("*.json"))
    pair_file.write_text(json.dumps({"src_json_path": "somewhere/else.json", "trg_json_path": "x.json"}))
    with pytest.raises(DatasetError, match="not under an ImageAnnotation/ folder"):
        load_ap10k(root)
    annotation = root / "ImageAnnotation" / "canidae" / "wolf" / f"{stem(3)}.json"
    data = json.loads(annotation.read_text())
    data["keypoints"] = data["keypoints"][:-3]
    annotation.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="48 keypoint values; expected 51"):
        load_ap10k(root, "cross-species")


def test_cli_scores_the_cross_family_subset(ap_tree, tmp_path):
    root, features = ap_tree
    output = tmp_path / "ap10k.json"
    argv = ["eval", "ap10k", "--root", str(root), "--subset", "cross-family", "--features", str(features),
            "--output", str(output), "--quiet"]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["benchmark"]["subset"] == "cross-family"
    assert (list(results["per_category"]), results["all_per_point"]) == (["all"], 50.0)


def test_a_sweep_on_ap10k_reads_its_subset(ap_tree, flux_pipeline_dir, tmp_path):
    root, _ = ap_tree
    argv = ["sweep", "ap10k", "--root", str(root), "--split", "test", "--subset", "cross-family",
            "--model", str(flux_pipeline_dir), "--blocks", "28", "--t", "261", "--pairs", "1",
            "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "sweep"), "--ensemble", "1",
            "--resolution", "64", "--dtype", "fp32", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert results["benchmark"]["subset"] == "cross-family" and results["benchmark"]["pairs"] == 1
    assert results["best"]["block"] == 28 and results["best"]["t"] == 261.0
