"""PF-Pascal: a small tree in the real layout (weakalign CSV + JPEGImages + Annotations/*.mat)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from safetensors.torch import save_file

from ditf.cli import main
from ditf.errors import DatasetError
from ditf.eval import evaluate_pfpascal
from ditf.eval.pfpascal import load_pfpascal

# 90x60 images with 6x4 feature grids: stride 15, so cell (row, col) is centred on pixel (15 col + 7, 15 row + 7).
# Matches sit in inner cells: on border cells PyTorch's clamping makes several pixels tie.
GRID, SIZE = (4, 6), (90, 60)
HEADER = "source_image,target_image,class,XA,YA,XB,YB\n"


def cell_centre(row: int, col: int) -> list[int]:
    return [15 * col + 7, 15 * row + 7]


def one_hot_features(cells: list[tuple[int, int]], channels: int = 3) -> torch.Tensor:
    """Channel k is 1 at keypoint k's cell; the last (background) channel is 1 everywhere else."""
    feats = torch.zeros(channels, *GRID)
    feats[-1] = 1.0
    for k, (row, col) in enumerate(cells):
        feats[:, row, col] = 0.0
        feats[k, row, col] = 1.0
    return feats


# (class id, class, source stem, target stem, source cells, target cells (the matches), target truth)
PAIRS = [
    (1, "aeroplane", "a1", "a2", [(1, 1), (3, 5)], [(1, 1), (2, 4)], [[22, 22], [67, 42]]),  # errors 0 and 5 px
    (12, "dog", "d1", "d2", [(2, 2)], [(1, 3)], [[64, 22]]),  # error 12 px
]


@pytest.fixture
def pf_tree(tmp_path) -> tuple[Path, Path]:
    """(dataset root, features folder)."""
    root, features = tmp_path / "PF-dataset-PASCAL", tmp_path / "features"
    (root / "JPEGImages").mkdir(parents=True)
    rows = []
    for class_id, category, src, trg, src_cells, trg_cells, truth in PAIRS:
        (features / category).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / category).mkdir(parents=True, exist_ok=True)
        for stem, cells in ((src, src_cells), (trg, trg_cells)):
            Image.new("RGB", SIZE).save(root / "JPEGImages" / f"{stem}.jpg")
            save_file({"features": one_hot_features(cells)}, features / category / f"{stem}.safetensors")
        scipy.io.savemat(root / "Annotations" / category / f"{trg}.mat", {"bbox": np.array([[10.0, 5.0, 80.0, 55.0]])})
        source_points = [cell_centre(*cell) for cell in src_cells]
        columns = [f"PF-dataset-PASCAL/JPEGImages/{src}.jpg", f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg", str(class_id)]
        for points in (source_points, truth):
            columns += [";".join(str(p[0]) for p in points), ";".join(str(p[1]) for p in points)]
        rows.append(",".join(columns) + "\n")
    (root / "test_pairs_pf_pascal.csv").write_text(HEADER + "".join(rows))
    return root, features


def test_loader_reads_weakalign_rows(pf_tree):
    root, _ = pf_tree
    dataset = load_pfpascal(root)
    assert dataset.categories == ["aeroplane", "dog"] and dataset.default_threshold == "image"
    aeroplane = dataset.pairs[0]
    assert aeroplane.name == "00002-a1-a2:aeroplane"  # CSV row number (the header is row 1)
    assert aeroplane.source_points.tolist() == [[22, 22], [82, 52]]
    assert aeroplane.target_points.tolist() == [[22, 22], [67, 42]]
    assert aeroplane.source.size == (60, 90) and aeroplane.target_bbox is None
    assert load_pfpascal(root, categories=["dog"]).categories == ["dog"]


def test_scores_against_the_image_size_at_pf_pascal_alphas(pf_tree):
    root, features = pf_tree
    dataset = load_pfpascal(root)
    results = evaluate_pfpascal(root, features=features, progress=False)
    assert [results["pairs"][p.name]["pred_trg_kps"] for p in dataset.pairs] == [[[22, 22], [67, 37]], [[52, 22]]]
    # alpha 0.1 of the 90 px image side = 9 px: errors 0 and 5 pass, 12 fails.
    assert results["per_category"]["aeroplane"]["per_point"] == 100.0 and results["per_category"]["dog"]["per_point"] == 0.0
    assert (results["all_per_point"], results["all_per_image"], results["mean_per_point"]) == (200 / 3, 50.0, 50.0)
    assert results["by_alpha"]["0.05"]["all_per_point"] == 100 / 3  # 4.5 px: only the exact match
    assert results["by_alpha"]["0.15"]["all_per_point"] == 100.0  # 13.5 px: all three


def test_bbox_threshold_reads_the_object_boxes(pf_tree):
    root, features = pf_tree
    dataset = load_pfpascal(root, with_boxes=True)
    assert dataset.pairs[0].target_bbox == (10.0, 5.0, 80.0, 55.0)
    results = evaluate_pfpascal(root, features=features, threshold="bbox", progress=False)
    # box max side 70 px: 0.05 -> 3.5 px fails the 5 px error, 0.15 -> 10.5 px fails the 12 px error.
    assert results["by_alpha"]["0.05"]["all_per_point"] == 100 / 3
    assert results["by_alpha"]["0.15"]["all_per_point"] == 200 / 3


def test_loader_names_missing_files_and_bad_rows(pf_tree):
    root, _ = pf_tree
    with pytest.raises(DatasetError, match="val_pairs_pf_pascal.csv.*weakalign"):
        load_pfpascal(root, split="val")
    csv_path = root / "test_pairs_pf_pascal.csv"
    good = csv_path.read_text()
    csv_path.write_text(HEADER + "PF-dataset-PASCAL/JPEGImages/a1.jpg,PF-dataset-PASCAL/JPEGImages/a2.jpg,21,1,1,1,1\n")
    with pytest.raises(DatasetError, match="row 2 has class 21; expected 1..20"):
        load_pfpascal(root)
    csv_path.write_text(HEADER + "PF-dataset-PASCAL/JPEGImages/a1.jpg,PF-dataset-PASCAL/JPEGImages/a2.jpg,1,95,1,1,1\n")
    with pytest.raises(DatasetError, match="source keypoints \\[\\[95, 1\\]\\] lie outside the 90x60"):
        load_pfpascal(root)
    csv_path.write_text(good)
    (root / "JPEGImages" / "d2.jpg").unlink()
    with pytest.raises(DatasetError, match="names image 'PF-dataset-PASCAL/JPEGImages/d2.jpg'"):
        load_pfpascal(root)


def test_cli_scores_pf_pascal(pf_tree, tmp_path):
    root, features = pf_tree
    output = tmp_path / "pf.json"
    argv = ["eval", "pfpascal", "--root", str(root), "--features", str(features), "--output", str(output), "--quiet"]
    assert main(argv) == 0
    results = json.loads(output.read_text())
    assert results["all_per_point"] == 200 / 3 and results["benchmark"]["name"] == "pf-pascal"


def test_a_sweep_on_pf_pascal_scores_every_block_and_timestep(pf_tree, flux_pipeline_dir, tmp_path):
    root, _ = pf_tree
    argv = ["sweep", "pfpascal", "--root", str(root), "--split", "test", "--model", str(flux_pipeline_dir),
            "--blocks", "19,28", "--t", "100,261", "--pairs", "2", "--cache", str(tmp_path / "cache"),
            "-o", str(tmp_path / "sweep"), "--ensemble", "1", "--resolution", "64", "--dtype", "fp32",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert results["benchmark"]["name"] == "pf-pascal"
    assert (results["blocks"], results["t"]) == ([19, 28], [100.0, 261.0])
    assert len(results["per_point"]) == 2 and all(len(row) == 2 for row in results["per_point"])
