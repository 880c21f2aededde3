"""ADE20K segmentation transfer: mmsegmentation-exact scorer, loader errors, and the linear probe."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.ade20k import ADE20K_CLASSES, class_name, load_ade20k, reduce_zero_label, write_label_png
from ditf.eval.segmentation_metrics import intersect_and_union, score_segmentation, summarize
from ditf.eval.segmentation_probe import (
    ProbeSettings,
    batch_indices,
    learning_rate_at,
    load_trained_probe,
    run_probe,
    train_probe,
    upsampled_argmax,
)

FIXTURE = Path(__file__).parent / "fixtures" / "ade20k_mini"
PREDICTIONS = FIXTURE / "predictions"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


# ---------------------------------------------------------------------- scorer vs mmsegmentation


def test_fixture_scores_equal_mmsegmentation(tmp_path):
    output = tmp_path / "scores.json"
    scores = score_segmentation(FIXTURE, PREDICTIONS, output=output, progress=False)
    written = json.loads(output.read_text())
    for result in (scores, written):
        for key in ("aAcc", "mIoU", "mAcc"):
            assert result[key] == pytest.approx(EXPECTED[key], abs=1e-4), key
        assert result["per_class"].keys() == EXPECTED["per_class"].keys()
        for class_id, expected in EXPECTED["per_class"].items():
            for key, value in expected.items():
                if math.isnan(value):  # mmsegmentation's NaN (a class only predicted) is null in strict JSON
                    assert result["per_class"][class_id][key] is None, (class_id, key)
                else:
                    assert result["per_class"][class_id][key] == pytest.approx(value, abs=1e-4), (class_id, key)
    assert scores["num_images"] == 6


def test_reduce_zero_label_maps_other_to_ignore_and_shifts_classes():
    assert reduce_zero_label(np.array([0, 1, 2, 150, 255])).tolist() == [255, 0, 1, 149, 255]


def test_three_by_three_reduce_zero_label_and_ignored_pixels():
    # Annotation convention: 0 = other (ignored); a predicted 0 is a miss; a prediction on an ignored pixel is free.
    label = np.array([[1, 1, 2], [2, 2, 0], [0, 3, 3]])
    pred = np.array([[1, 2, 2], [2, 0, 5], [1, 3, 3]])
    areas = intersect_and_union(pred, label)
    assert areas.intersect[:3].tolist() == [1, 2, 2]
    assert areas.pred[:3].tolist() == [1, 3, 2]  # the 5 sits on an ignored pixel, the 0 is no class
    assert areas.label[:3].tolist() == [2, 3, 2]
    assert areas.union[:3].tolist() == [2, 4, 2]
    scores = summarize(areas)
    assert scores["aAcc"] == pytest.approx(100 * 5 / 7)
    assert scores["per_class"] == {
        "1": {"IoU": 50.0, "Acc": 50.0},
        "2": {"IoU": 50.0, "Acc": pytest.approx(200 / 3)},
        "3": {"IoU": 100.0, "Acc": 100.0},
    }
    assert scores["mIoU"] == pytest.approx(100 * 2 / 3)
    assert scores["mAcc"] == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)


def test_label_255_is_ignored_whatever_is_predicted():
    label = np.array([[4, 4, 255], [4, 4, 255], [255, 255, 255]])
    pred = np.array([[4, 4, 9], [4, 4, 9], [9, 9, 0]])
    scores = summarize(intersect_and_union(pred, label))
    assert scores["per_class"] == {"4": {"IoU": 100.0, "Acc": 100.0}}
    assert scores["aAcc"] == scores["mIoU"] == scores["mAcc"] == 100.0


def test_a_class_only_predicted_has_iou_zero_and_no_accuracy():
    label = np.full((3, 3), 12)
    pred = np.array([[12, 12, 12], [12, 12, 12], [7, 7, 7]])
    scores = summarize(intersect_and_union(pred, label))
    assert scores["per_class"]["7"]["IoU"] == 0.0
    assert scores["per_class"]["7"]["Acc"] is None  # mmsegmentation's NaN, null in JSON
    assert scores["mIoU"] == pytest.approx((100 * 6 / 9 + 0) / 2)  # the predicted-only class counts in mIoU
    assert scores["mAcc"] == pytest.approx(100 * 6 / 9)  # ... but not in mAcc (nanmean)


def test_areas_are_summed_over_images_before_dividing():
    small = intersect_and_union(np.array([[1]]), np.array([[1]]))  # 1/1 right
    large = intersect_and_union(np.zeros((3, 3), int) + 2, np.ones((3, 3), int))  # 0/9 right
    assert summarize(small + large)["per_class"]["1"]["Acc"] == pytest.approx(10.0)  # 1/10, not mean(100, 0)


def test_class_names_are_the_150_mmsegmentation_names():
    assert len(ADE20K_CLASSES) == 150
    assert (class_name(1), class_name(8), class_name(150)) == ("wall", "bed", "flag")
    with pytest.raises(InvalidArgumentError, match="1 to 150"):
        class_name(0)


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    root = tmp_path / "ade"
    shutil.copytree(FIXTURE, root)
    return root


def test_missing_annotation_folder_names_it_and_the_download(fixture_copy):
    folder = fixture_copy / "ADEChallengeData2016" / "annotations" / "validation"
    shutil.rmtree(folder)
    with pytest.raises(DatasetError, match="ADEChallengeData2016.zip") as error:
        score_segmentation(fixture_copy, fixture_copy / "predictions", progress=False)
    assert str(folder) in str(error.value)


def test_partial_tree_names_the_missing_image(fixture_copy):
    (fixture_copy / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_04100003.jpg").unlink()
    with pytest.raises(DatasetError, match="ADE_val_04100003.jpg"):
        load_ade20k(fixture_copy, "validation")
    assert len(load_ade20k(fixture_copy, "validation", require_images=False)) == 6


def test_missing_split_is_named(fixture_copy):
    with pytest.raises(DatasetError, match="training"):
        load_ade20k(fixture_copy, "training")


def test_missing_prediction_is_named(fixture_copy):
    (fixture_copy / "predictions" / "ADE_val_04100002.png").unlink()
    with pytest.raises(DatasetError, match="ADE_val_04100002.png"):
        score_segmentation(fixture_copy, fixture_copy / "predictions", progress=False)


def test_prediction_of_the_wrong_size_is_named_with_the_fix(fixture_copy):
    target = fixture_copy / "predictions" / "ADE_val_04100001.png"
    Image.fromarray(np.ones((10, 12), np.uint8)).save(target)
    with pytest.raises(DatasetError, match="annotation's size") as error:
        score_segmentation(fixture_copy, fixture_copy / "predictions", progress=False)
    assert str(target) in str(error.value) and "12x10" in str(error.value)


def test_prediction_with_an_id_above_150_is_named_with_the_fix(fixture_copy):
    target = fixture_copy / "predictions" / "ADE_val_04100004.png"
    ids = np.array(Image.open(target))
    ids[0, 0] = 151
    Image.fromarray(ids).save(target)
    with pytest.raises(DatasetError, match="id 151") as error:
        score_segmentation(fixture_copy, fixture_copy / "predictions", progress=False)
    assert str(target) in str(error.value) and "add 1" in str(error.value)


def test_colour_prediction_is_refused(fixture_copy):
    target = fixture_copy / "predictions" / "ADE_val_04100000.png"
    Image.open(target).convert("RGB").save(target)
    with pytest.raises(DatasetError, match="single-channel"):
        score_segmentation(fixture_copy, fixture_copy / "predictions", progress=False)


# --------------------------------------------------------------------------------------- the probe

CLASSES = (3, 17, 42, 101, 150)
GRID, CELL, REGION, CHANNELS = 8, 4, 2, 16
"""Features are GRID x GRID cells of CELL x CELL pixels; a class region spans REGION x REGION cells."""


def make_synthetic_ade20k(root: Path, train_images: int = 8, val_images: int = 4) -> Path:
    """ADE layout whose 32x32 annotations are 4x4 grids of 8x8 pixel regions of CLASSES (and some 0 = other)."""
    rng = np.random.default_rng(0)
    for split, count in (("training", train_images), ("validation", val_images)):
        for index in range(count):
            stem = f"ADE_{split[:5]}_{index:08d}"
            regions = rng.choice(CLASSES, size=(GRID // REGION, GRID // REGION))
            regions[rng.random(regions.shape) < 0.1] = 0
            labels = np.kron(regions, np.ones((REGION * CELL, REGION * CELL), dtype=np.int64))
            write_label_png(root / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png", labels)
            image_path = root / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (GRID * CELL, GRID * CELL, 3), dtype=np.uint8)).save(image_path)
    return root


class PrototypeFeatures:
    """features_for(image): each CELL x CELL label block becomes one feature cell = its class prototype + noise."""

    def __init__(self, noise: float = 0.3):
        self.prototypes = torch.randn(256, CHANNELS, generator=torch.Generator().manual_seed(1)) * 2
        self.noise = noise
        self.calls = 0

    def __call__(self, image: Path) -> torch.Tensor:
        self.calls += 1
        annotation = image.parents[2] / "annotations" / image.parent.name / f"{image.stem}.png"
        cells = torch.from_numpy(np.array(Image.open(annotation))[::CELL, ::CELL].astype(np.int64))
        generator = torch.Generator().manual_seed(sum(image.stem.encode()))
        noise = self.noise * torch.randn(GRID, GRID, CHANNELS, generator=generator)
        return (self.prototypes[cells] + noise).permute(2, 0, 1).to(torch.float16)


FAST = ProbeSettings(steps=40, batch_size=4, learning_rate=0.05, warmup_steps=0, label_short_side=None,
                     checkpoint_every=10, seed=3)  # fmt: skip


def test_probe_separates_prototype_classes(tmp_path):
    root = make_synthetic_ade20k(tmp_path / "data")
    results = run_probe(root, PrototypeFeatures(), tmp_path / "run", settings=FAST, progress=False,
                        feature_record={"kind": "prototypes"})  # fmt: skip
    assert results["scores"]["mIoU"] >= 95
    assert set(results["scores"]["per_class"]) == {str(c) for c in CLASSES}
    assert results["training"]["total_steps"] == 40
    assert "head type" in " ".join(results["probe_card"]["not_published_by_ditf"])
    loss_curve = tmp_path / "run" / "train" / "loss_curve.png"
    assert loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((tmp_path / "run" / "train" / "loss_history.json").read_text())["loss_per_step"]
    assert len(history) == 40 and history[-1] < history[0] / 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["scores"]["mIoU"] >= 95
    prediction = Image.open(tmp_path / "run" / "pred" / "ADE_valid_00000000.png")
    assert prediction.mode == "L" and prediction.size == (32, 32)
    ids = np.array(prediction)
    assert 1 <= ids.min() and ids.max() <= 150  # the annotation convention: 0 is never predicted


def test_a_finished_run_is_not_retrained_and_another_run_is_refused(tmp_path):
    root = make_synthetic_ade20k(tmp_path / "data", train_images=4, val_images=2)
    settings = ProbeSettings(steps=4, batch_size=2, warmup_steps=0, label_short_side=None, checkpoint_every=2)
    run_probe(root, PrototypeFeatures(), tmp_path / "run", settings=settings, progress=False)
    features = PrototypeFeatures()
    again = run_probe(root, features, tmp_path / "run", settings=settings, progress=False)
    assert features.calls == 0 and again["training"]["resumed_from_step"] == 4
    with pytest.raises(InvalidArgumentError, match="settings"):
        run_probe(root, features, tmp_path / "run", settings=ProbeSettings(steps=5), progress=False)


class Killed(Exception):
    pass


def test_killed_training_resumes_to_bit_identical_weights(tmp_path):
    root = make_synthetic_ade20k(tmp_path / "data", train_images=5, val_images=1)
    samples = load_ade20k(root, "training")
    settings = ProbeSettings(steps=10, batch_size=3, learning_rate=0.05, warmup_steps=3, label_short_side=24,
                             checkpoint_every=3)  # fmt: skip
    whole = train_probe(samples, PrototypeFeatures(), tmp_path / "whole", settings, progress=False)

    def kill_after_seven_steps(step: int, loss: float) -> None:
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_probe(samples, PrototypeFeatures(), tmp_path / "killed", settings, progress=False,
                    on_step=kill_after_seven_steps)  # fmt: skip
    resumed = train_probe(samples, PrototypeFeatures(), tmp_path / "killed", settings, progress=False)
    assert resumed.resumed_from_step == 6
    assert resumed.losses == whole.losses
    for name, tensor in whole.probe.state_dict().items():
        assert torch.equal(tensor, resumed.probe.state_dict()[name]), name
    reloaded = load_trained_probe(tmp_path / "killed" / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), whole.probe.state_dict().values()))
    with pytest.raises(InvalidArgumentError, match="settings"):
        train_probe(samples, PrototypeFeatures(), tmp_path / "killed", ProbeSettings(steps=10), progress=False)


@pytest.mark.parametrize("head", ["linear_no_bn", "mlp"])
def test_other_heads_train(tmp_path, head):
    root = make_synthetic_ade20k(tmp_path / "data", train_images=4, val_images=1)
    settings = ProbeSettings(head=head, steps=30, batch_size=4, learning_rate=0.05, warmup_steps=0,
                             label_short_side=None, hidden_channels=32)  # fmt: skip
    trained = train_probe(load_ade20k(root, "training"), PrototypeFeatures(), tmp_path / head, settings, progress=False)
    assert trained.losses[-1] < trained.losses[0] / 4


def test_image_order_is_a_seeded_permutation_per_epoch():
    first_epoch = batch_indices(0, 6, 3, seed=0) + batch_indices(1, 6, 3, seed=0)
    assert sorted(first_epoch) == list(range(6))
    assert batch_indices(2, 6, 3, seed=0) + batch_indices(3, 6, 3, seed=0) != first_epoch  # reshuffled
    assert batch_indices(5, 6, 4, seed=1) == batch_indices(5, 6, 4, seed=1)


def test_epochs_set_the_number_of_steps():
    assert ProbeSettings(epochs=2, batch_size=3).total_steps(5) == 4  # ceil(2 * 5 / 3)
    assert ProbeSettings(steps=7).total_steps(5) == 7


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    settings = ProbeSettings(learning_rate=1e-3, warmup_steps=10, warmup_ratio=1e-6)
    assert learning_rate_at(0, 100, settings) == pytest.approx(1e-9)
    assert learning_rate_at(5, 100, settings) == pytest.approx(1e-3 * 0.95 * 0.5, rel=1e-5)
    assert learning_rate_at(50, 100, settings) == pytest.approx(0.5e-3)
    assert learning_rate_at(100, 100, settings) == 0.0


def test_chunked_upsampled_argmax_equals_the_full_argmax():
    logits = torch.randn(150, 5, 7, generator=torch.Generator().manual_seed(0))
    full = torch.nn.functional.interpolate(logits[None], size=(23, 31), mode="bilinear", align_corners=False)[0]
    assert torch.equal(upsampled_argmax(logits, (23, 31), class_chunk=32), full.argmax(dim=0))


def test_bad_settings_and_features_are_explained(tmp_path):
    with pytest.raises(InvalidArgumentError, match="head='deep'"):
        ProbeSettings(head="deep")
    root = make_synthetic_ade20k(tmp_path / "data", train_images=2, val_images=1)
    with pytest.raises(InvalidArgumentError, match=r"\(C, h, w\)"):
        train_probe(load_ade20k(root, "training"), lambda image: torch.zeros(4, 4), tmp_path / "bad", progress=False)
