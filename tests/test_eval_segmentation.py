"""ADE20K segmentation transfer: mmsegmentation-exact scorer, loader errors, and the linear probe."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.ade20k import ADE20K_CLASSES, class_name, load_ade20k, reduce_zero_label
from ditf.eval.segmentation_metrics import intersect_and_union, score_segmentation, summarize

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
                assert result["per_class"][class_id][key] == pytest.approx(value, abs=1e-4, nan_ok=True)
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
    assert math.isnan(scores["per_class"]["7"]["Acc"])
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
