"""DAVIS-2017: J&F scorer against the official toolkit, loader errors, propagation runs, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ditf.cli import main
from ditf.errors import DatasetError, ImageError, InvalidArgumentError
from ditf.eval.davis import (
    davis_frame_size,
    davis_palette,
    load_davis,
    read_label_png,
    run_davis,
    score_davis,
    write_label_png,
)
from ditf.eval.davis_metrics import (
    boundary_f_measure,
    boundary_map,
    region_similarity,
    sequence_statistics,
)
from ditf.matching.propagation import PropagationSettings

FIXTURE = Path(__file__).parent / "fixtures" / "davis_mini"
DAVIS_ROOT = FIXTURE / "DAVIS"
RESULTS = FIXTURE / "results"
EXPECTED = json.loads((FIXTURE / "expected_official.json").read_text())


# ------------------------------------------------------------------------------ scorer vs toolkit


@pytest.fixture(scope="module")
def fixture_scores(tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("scores") / "jf.json"
    return score_davis(DAVIS_ROOT, RESULTS, "val", output=output, progress=False), output


def test_scores_equal_the_official_toolkit(fixture_scores):
    scores, _ = fixture_scores
    for key, value in EXPECTED["global"].items():
        assert scores["global"][key] == pytest.approx(value, abs=1e-6), key
    assert list(scores["per_object"]) == list(EXPECTED["per_object"])
    for name, expected in EXPECTED["per_object"].items():
        for key, value in expected.items():
            assert scores["per_object"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_scores_json_is_written_with_the_same_numbers(fixture_scores):
    scores, output = fixture_scores
    written = json.loads(output.read_text())
    assert written["global"] == scores["global"]
    assert written["protocol"]["sequences"] == ["blackswan", "bike-packing"]
    assert [p.name for p in output.parent.iterdir()] == ["jf.json"]  # no temporary file left behind


def toolkit_style_f(gt: np.ndarray, pred: np.ndarray) -> float:
    """Reference F: dilate both boundary maps with the disk {x^2 + y^2 <= r^2}, as the toolkit does."""
    radius = int(np.ceil(0.008 * np.hypot(*gt.shape)))
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    gt_b, pred_b = boundary_map(gt), boundary_map(pred)
    if not gt_b.any() or not pred_b.any():
        return float(gt_b.any() == pred_b.any())
    precision = (pred_b & ndimage.binary_dilation(gt_b, disk)).sum() / pred_b.sum()
    recall = (gt_b & ndimage.binary_dilation(pred_b, disk)).sum() / gt_b.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def random_blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), sigma=6) > 0.5 + 0.02 * rng.standard_normal()


def test_boundary_f_equals_disk_dilation_reference():
    rng = np.random.default_rng(0)
    for shape in [(120, 200), (97, 61), (120, 200), (97, 61), (480, 854)]:
        for _ in range(2):
            gt, pred = random_blobs(rng, shape), random_blobs(rng, shape)
            assert boundary_f_measure(gt, pred) == pytest.approx(toolkit_style_f(gt, pred), abs=1e-12)
    empty, square = np.zeros((50, 50), bool), np.zeros((50, 50), bool)
    square[10:20, 10:20] = True
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(square, empty) == 0.0 and boundary_f_measure(empty, square) == 0.0


def test_boundary_map_marks_pixels_before_each_edge():
    mask = np.zeros((5, 5), bool)
    mask[1:3, 1:3] = True
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    assert (boundary_map(mask) == expected).all()


def test_region_similarity_counts_two_empty_masks_as_perfect():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    gt[1, :2], pred[1, :1] = True, True
    gt[2, 0, 0] = True
    assert region_similarity(gt, pred).tolist() == [1.0, 0.5, 0.0]


def test_statistics_mean_recall_and_decay_over_quarters():
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    mean, recall, decay = sequence_statistics(values)
    # quarter bins of 9 frames: [0..2], [2..4], [4..6], [6..8] (inclusive, as in the toolkit)
    assert mean == pytest.approx(0.6)
    assert recall == pytest.approx(5 / 9)
    assert decay == pytest.approx(0.9 - 0.3)


# ----------------------------------------------------------------------------------- bad inputs


@pytest.fixture()
def results_copy(tmp_path) -> Path:
    shutil.copytree(RESULTS / "blackswan", tmp_path / "results" / "blackswan")
    return tmp_path / "results"


def test_missing_sequence_folder_in_results_is_named(results_copy):
    with pytest.raises(DatasetError, match="no sub-folder for sequence 'bike-packing'"):
        score_davis(DAVIS_ROOT, results_copy, progress=False)


def test_missing_result_frames_are_listed(results_copy):
    (results_copy / "blackswan" / "00007.png").unlink()
    (results_copy / "blackswan" / "00012.png").unlink()
    with pytest.raises(DatasetError, match=r"lacks 2 of the 48 scored frames \(00007.png, 00012.png"):
        score_davis(DAVIS_ROOT, results_copy, sequences=["blackswan"], progress=False)


def test_result_of_the_wrong_size_is_named(results_copy):
    write_label_png(results_copy / "blackswan" / "00003.png", np.zeros((240, 427), np.uint8))
    with pytest.raises(DatasetError, match=r"00003.png is 427x240 \(WxH\) but the annotation is 854x480"):
        score_davis(DAVIS_ROOT, results_copy, sequences=["blackswan"], progress=False)


def test_result_with_an_unknown_object_id_is_rejected(results_copy):
    write_label_png(results_copy / "blackswan" / "00003.png", np.full((480, 854), 2, np.uint8))
    with pytest.raises(DatasetError, match="object id 2, but its first annotation has 1 object"):
        score_davis(DAVIS_ROOT, results_copy, sequences=["blackswan"], progress=False)


def test_rgb_result_png_is_rejected(results_copy):
    Image.new("RGB", (854, 480)).save(results_copy / "blackswan" / "00003.png")
    with pytest.raises(ImageError, match="indexed PNGs"):
        score_davis(DAVIS_ROOT, results_copy, sequences=["blackswan"], progress=False)


def test_incomplete_dataset_tree_names_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*davischallenge.org"):
        load_davis(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"ImageSets/2017/val.txt is missing"):
        load_davis(tmp_path)
    shutil.copytree(DAVIS_ROOT / "ImageSets", tmp_path / "ImageSets")
    shutil.copytree(DAVIS_ROOT / "Annotations/480p/blackswan", tmp_path / "Annotations/480p/blackswan")
    with pytest.raises(DatasetError, match="annotations of sequence 'bike-packing' are missing"):
        load_davis(tmp_path, require_frames=False)
    with pytest.raises(DatasetError, match=r"JPEGImages/480p is missing"):
        load_davis(tmp_path, sequences=["blackswan"])
    with pytest.raises(InvalidArgumentError, match="not in the DAVIS-2017 val list"):
        load_davis(tmp_path, sequences=["cows"], require_frames=False)


# --------------------------------------------------------------------------- PNGs and frame sizes


def test_label_png_round_trip_is_indexed_with_the_davis_palette(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_label_png(tmp_path / "seq" / "00000.png", labels)
    with Image.open(tmp_path / "seq" / "00000.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]
    assert (read_label_png(tmp_path / "seq" / "00000.png") == labels).all()
    assert davis_palette()[9].tolist() == [192, 0, 0]  # the VOC map the toolkit writes


def test_frame_size_sets_the_short_side_and_floors_the_long_side():
    assert davis_frame_size(480, 854) == (960, 1696)  # 1708 floored to a multiple of 32
    assert davis_frame_size(480, 910) == (960, 1792)
    assert davis_frame_size(854, 480, short_side=480) == (832, 480)


# ----------------------------------------------------------------------------------- propagation

OBJECT_COLOURS = np.array([[30, 30, 30], [120, 140, 60], [100, 240, 110]], dtype=float)
FRAME_STEP = 3  # every third frame: faster motion, fewer frames
SHORT_SIDE = 240


@pytest.fixture(scope="module")
def synthetic_davis(tmp_path_factory) -> Path:
    """davis_mini with painted frames: each object a flat noisy colour over a dark noisy background."""
    root = tmp_path_factory.mktemp("davis") / "DAVIS"
    shutil.copytree(DAVIS_ROOT / "ImageSets", root / "ImageSets")
    rng = np.random.default_rng(0)
    for sequence in ["blackswan", "bike-packing"]:
        annotations = sorted((DAVIS_ROOT / "Annotations/480p" / sequence).glob("*.png"))[::FRAME_STEP]
        for index, annotation in enumerate(annotations):
            target = root / "Annotations/480p" / sequence / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(annotation, target)
            labels = read_label_png(annotation)
            frame = OBJECT_COLOURS[labels] + rng.normal(0, 10, (*labels.shape, 3))
            frame_path = root / "JPEGImages/480p" / sequence / f"{index:05d}.jpg"
            frame_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(frame_path, quality=90)
    return root


def colour_features(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(5, H/16, W/16): centred RGB averaged over 16x16 cells, plus weak (y, x) position channels."""
    with Image.open(image_path) as image:
        rgb = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), np.float32) / 255
    pooled = F.avg_pool2d(torch.from_numpy(rgb - 0.5).permute(2, 0, 1)[None], 16)[0]
    ys, xs = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in pooled.shape[1:]), indexing="ij")
    return torch.cat([pooled, 0.2 * ys[None], 0.2 * xs[None]])


@pytest.fixture(scope="module")
def propagated(synthetic_davis, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("out")
    status = run_davis(synthetic_davis, colour_features, output, short_side=SHORT_SIDE, progress=False)
    return output, status


def test_propagation_scores_well_above_copying_the_first_mask(synthetic_davis, propagated, tmp_path):
    output, status = propagated
    assert status == {"blackswan": "propagated", "bike-packing": "propagated"}
    for sequence in ["blackswan", "bike-packing"]:
        annotations = sorted((synthetic_davis / "Annotations/480p" / sequence).glob("*.png"))
        for annotation in annotations:
            write_label_png(tmp_path / "static" / sequence / annotation.name, read_label_png(annotations[0]))
    ours = score_davis(synthetic_davis, output, progress=False)["global"]
    static = score_davis(synthetic_davis, tmp_path / "static", progress=False)["global"]
    assert ours["J&F-Mean"] > 0.6
    assert ours["J&F-Mean"] > static["J&F-Mean"] + 0.15


def test_propagated_pngs_are_indexed_at_frame_size_with_the_annotation_first(synthetic_davis, propagated):
    output, _ = propagated
    written = sorted((output / "bike-packing").glob("*.png"))
    assert len(written) == len(list((synthetic_davis / "JPEGImages/480p/bike-packing").glob("*.jpg")))
    first = synthetic_davis / "Annotations/480p/bike-packing/00000.png"
    assert (read_label_png(written[0]) == read_label_png(first)).all()
    with Image.open(written[5]) as image:
        assert image.mode == "P" and image.size == (910, 480)
    assert set(np.unique(read_label_png(written[5]))) <= {0, 1, 2}


def test_run_resumes_by_skipping_finished_sequences(synthetic_davis, propagated):
    output, _ = propagated
    redo = output / "blackswan" / "00004.png"
    before = read_label_png(redo)
    redo.unlink()
    status = run_davis(synthetic_davis, colour_features, output, short_side=SHORT_SIDE, progress=False)
    assert status == {"blackswan": "propagated", "bike-packing": "skipped"}
    assert (read_label_png(redo) == before).all()


def test_run_refuses_to_mix_results_of_other_settings(synthetic_davis, propagated):
    output, _ = propagated
    with pytest.raises(InvalidArgumentError, match="holds DAVIS results of another run"):
        run_davis(synthetic_davis, colour_features, output, short_side=480, progress=False)


def test_run_rejects_features_off_the_frame_grid(synthetic_davis, tmp_path):
    def off_grid(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(3, 7, 11)

    with pytest.raises(InvalidArgumentError, match="7x11 grid .* resized to 240x416"):
        run_davis(synthetic_davis, off_grid, tmp_path, sequences=["blackswan"], short_side=SHORT_SIDE, progress=False)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_davis_score_writes_json_and_plot(tmp_path, capsys):
    output, plot = tmp_path / "jf.json", tmp_path / "jf.png"
    argv = ["eval", "davis-score", "--root", str(DAVIS_ROOT), "--results", str(RESULTS), "--sequences", "blackswan"]
    assert main(argv + ["--output", str(output), "--plot", str(plot), "--quiet"]) == 0
    written = json.loads(output.read_text())
    expected = EXPECTED["per_object"]["blackswan_1"]
    assert written["per_object"]["blackswan_1"]["J-Mean"] == pytest.approx(expected["J-Mean"], abs=1e-6)
    assert written["global"]["J&F-Mean"] == pytest.approx((expected["J-Mean"] + expected["F-Mean"]) / 2, abs=1e-6)
    assert plot.stat().st_size > 0
    assert '"J&F-Mean": 0.79075' in capsys.readouterr().out


def test_cli_davis_score_reports_a_missing_results_folder(tmp_path, capsys):
    argv = ["eval", "davis-score", "--root", str(DAVIS_ROOT), "--results", str(tmp_path / "none"), "--quiet"]
    assert main(argv) == 2
    assert "results folder" in capsys.readouterr().err


@pytest.fixture()
def short_davis(synthetic_davis, tmp_path) -> Path:
    """The synthetic tree cut to blackswan's first 4 frames."""
    root = tmp_path / "DAVIS"
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("blackswan\n")
    for kind, suffix in [("Annotations", "png"), ("JPEGImages", "jpg")]:
        (root / kind / "480p/blackswan").mkdir(parents=True)
        for index in range(4):
            name = f"{index:05d}.{suffix}"
            shutil.copy(synthetic_davis / kind / "480p/blackswan" / name, root / kind / "480p/blackswan" / name)
    return root


def test_cli_davis_propagates_then_scores_with_a_tiny_flux_as_the_library_does(short_davis, flux_pipeline_dir,
                                                                                tmp_path):
    output = tmp_path / "davis_out"
    argv = ["eval", "davis", "--root", str(short_davis), "--model", str(flux_pipeline_dir), "--output", str(output)]
    model = ["--block", "21", "--t", "90", "--dtype", "fp32", "--device", "cpu", "--short-side", "64", "--quiet"]
    assert main(argv + model + ["--topk", "3"]) == 0
    assert len(list((output / "blackswan").glob("*.png"))) == 4
    scores = json.loads((output / "jf.json").read_text())
    assert list(scores["per_object"]) == ["blackswan_1"]
    assert scores["settings"]["block"] == 21 and scores["settings"]["t"] == 90
    assert scores["settings"]["prompt"] == "a photo of a image" and scores["settings"]["ensemble"] == 1
    assert scores["settings"]["n_last_frames"] == PropagationSettings().n_last_frames and scores["settings"]["topk"] == 3
    assert scores["settings_sources"]["t"] == "given" and "eval_davis.sh" in scores["settings_sources"]["prompt"]

    from ditf.eval import DiTFExtractor, evaluate_davis

    extractor = DiTFExtractor(str(flux_pipeline_dir), task="davis", block=21, t=90, dtype="fp32", device="cpu")
    library = evaluate_davis(short_davis, output, extractor=extractor, short_side=64, topk=3,
                             scores=tmp_path / "library.json", progress=False)  # resumes: the PNGs are there
    assert json.loads(json.dumps(library)) == scores  # the dict the command line writes
