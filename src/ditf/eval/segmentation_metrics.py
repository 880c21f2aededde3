"""Semantic-segmentation scores with mmsegmentation's `IoUMetric` semantics, and the ADE20K scorer.

Per image, `intersect_and_union` counts, for every class, the pixels where prediction and label
agree (intersection), the predicted pixels, the labelled pixels and their union, ignoring pixels
whose label is `ignore_index`; predictions outside 0..num_classes-1 (e.g. 255 after
`reduce_zero_label` of a predicted 0) count for no class, so their pixels are misses. The areas are
summed over the whole split before `total_area_to_metrics` divides: aAcc = total intersection /
total labelled pixels, per class IoU = intersection / union and Acc = intersection / label area,
mIoU and mAcc = `nanmean` over classes (a class absent from labels and predictions has IoU NaN and
is skipped; a class that is only predicted has IoU 0 and Acc NaN, written None: JSON has no NaN).

Differences from mmsegmentation, none of which changes a score beyond float rounding: counts are
exact int64 (mmseg sums float32 histograms, which round above 2**24 pixels per class) and
percentages are not rounded to two decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.ade20k import (
    ADE20K_NUM_CLASSES,
    IGNORE_INDEX,
    Ade20kSample,
    load_ade20k,
    read_annotation,
    read_label_png,
)
from ditf.eval.ade20k import reduce_zero_label as reduce_zero
from ditf.io import write_json_atomic
from ditf.versions import ditf_version


@dataclass
class SegmentationAreas:
    """Per-class pixel counts, each an (num_classes,) int64 array; they add up over images."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    def __add__(self, other: SegmentationAreas) -> SegmentationAreas:
        return SegmentationAreas(
            self.intersect + other.intersect, self.union + other.union, self.pred + other.pred, self.label + other.label
        )

    @classmethod
    def zeros(cls, num_classes: int) -> SegmentationAreas:
        """All-zero counts for `num_classes` classes."""
        return cls(*(np.zeros(num_classes, dtype=np.int64) for _ in range(4)))


def intersect_and_union(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int = ADE20K_NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    reduce_zero_label: bool = True,
) -> SegmentationAreas:
    """Per-class pixel counts of one image (mmsegmentation `IoUMetric.intersect_and_union`).

    Args:
        pred: (H, W) predicted ids; label: (H, W) ground-truth ids, same shape.
        num_classes: classes are 0..num_classes-1 after the optional reduction.
        ignore_index: label value whose pixels are not counted.
        reduce_zero_label: apply `reduce_zero_label` (0 -> 255, k -> k - 1) to prediction and label
            alike, i.e. both are in the ADE20K annotation convention (1..150, 0 = other / no class).

    Returns:
        `SegmentationAreas` in pixels.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise InvalidArgumentError(f"pred has shape {pred.shape} but label has shape {label.shape}; they must match.")
    if reduce_zero_label:
        pred, label = reduce_zero(pred), reduce_zero(label)
    pred, label = pred.astype(np.int64).ravel(), label.astype(np.int64).ravel()
    counted = label != ignore_index
    pred, label = pred[counted], label[counted]
    pred_in_range = pred[(pred >= 0) & (pred < num_classes)]
    label_in_range = label[(label >= 0) & (label < num_classes)]
    intersect = pred[(pred == label) & (pred >= 0) & (pred < num_classes)]
    area_intersect = np.bincount(intersect, minlength=num_classes)
    area_pred = np.bincount(pred_in_range, minlength=num_classes)
    area_label = np.bincount(label_in_range, minlength=num_classes)
    return SegmentationAreas(area_intersect, area_pred + area_label - area_intersect, area_pred, area_label)


def total_area_to_metrics(areas: SegmentationAreas) -> dict[str, Any]:
    """aAcc (float) and per-class IoU and Acc ((num_classes,) float64, NaN where undefined), as fractions."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "aAcc": float(areas.intersect.sum() / areas.label.sum()),
            "IoU": areas.intersect / areas.union,
            "Acc": areas.intersect / areas.label,
        }


def summarize(areas: SegmentationAreas, reduce_zero_label: bool = True) -> dict[str, Any]:
    """Scores in percent: {"aAcc", "mIoU", "mAcc", "per_class": {"<class id>": {"IoU", "Acc"}}}.

    `per_class` lists the classes with a non-zero union, keyed by the id in the annotation
    convention (train id + 1 when `reduce_zero_label`). A score that mmsegmentation reports as NaN (the
    "Acc" of a class that is only predicted, never labelled) is None here, so the scores are strict JSON.
    """
    metrics = total_area_to_metrics(areas)
    offset = 1 if reduce_zero_label else 0
    with np.errstate(invalid="ignore"):
        iou, acc = metrics["IoU"], metrics["Acc"]
        mean_iou = float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")
        mean_acc = float(np.nanmean(acc)) if not np.all(np.isnan(acc)) else float("nan")
    return {
        "aAcc": percent_or_none(metrics["aAcc"]),
        "mIoU": percent_or_none(mean_iou),
        "mAcc": percent_or_none(mean_acc),
        "per_class": {
            str(index + offset): {"IoU": percent_or_none(iou[index]), "Acc": percent_or_none(acc[index])}
            for index in np.flatnonzero(areas.union > 0)
        },
    }


def percent_or_none(fraction: float) -> float | None:
    """100 * `fraction`, or None where it is undefined (NaN): JSON has no NaN."""
    return None if math.isnan(float(fraction)) else 100 * float(fraction)


# --------------------------------------------------------------------------------- ADE20K scorer


def score_segmentation(
    root: str | Path,
    predictions_dir: str | Path,
    split: str = "validation",
    output: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `<predictions_dir>/<stem>.png` against an ADE20K split with mmsegmentation's semantics.

    Args:
        root: the folder holding `ADEChallengeData2016/` (only `annotations/<split>/` is read).
        predictions_dir: one single-channel PNG per annotation, same stem and size, ids in the
            annotation convention (1..150 classes, 0 = no class, scored as a miss).
        split: "validation" (default) or "training".
        output: if given, the scores are also written there as JSON (atomically).
        progress: show a tqdm bar over images.

    Returns:
        {"aAcc", "mIoU", "mAcc": percent, "per_class": {"<class id>": {"IoU", "Acc"}} (percent; None where
         mmsegmentation has NaN), "num_images", "protocol", "ditf_version"}.

    Raises:
        DatasetError: the tree is incomplete, or a prediction is missing, of the wrong size, not a
            single-channel image or holds ids above 150; the message names the file and the fix.
    """
    predictions_dir = Path(predictions_dir)
    if not predictions_dir.is_dir():
        raise DatasetError(
            f"predictions folder {predictions_dir} does not exist; pass the folder holding one <stem>.png per "
            f"ADE20K {split} annotation."
        )
    samples = load_ade20k(root, split, require_images=False)
    _check_predictions_complete(samples, predictions_dir)
    areas = SegmentationAreas.zeros(ADE20K_NUM_CLASSES)
    for sample in tqdm(samples, desc=f"ADE20K {split} mIoU", disable=not progress):
        label = read_annotation(sample.annotation)
        pred = read_prediction(predictions_dir / f"{sample.stem}.png", label.shape, sample.annotation)
        areas = areas + intersect_and_union(pred, label, ADE20K_NUM_CLASSES, IGNORE_INDEX, reduce_zero_label=True)
    if areas.label.sum() == 0:
        raise DatasetError(
            f"the ADE20K {split} annotations under {root} contain no labelled pixel (all 0 or 255); nothing to score."
        )
    scores = {
        **summarize(areas, reduce_zero_label=True),
        "num_images": len(samples),
        "protocol": {
            "benchmark": "ADE20K (SceneParsing, ADEChallengeData2016)",
            "split": split,
            "num_classes": ADE20K_NUM_CLASSES,
            "reduce_zero_label": "applied to annotation and prediction: 0 -> 255 (ignored / miss), k -> k - 1",
            "ignore_index": IGNORE_INDEX,
            "averaging": "areas summed over the split; mIoU, mAcc = nanmean over classes; percent",
            "reference": "open-mmlab/mmsegmentation IoUMetric (intersect_and_union, total_area_to_metrics)",
        },
        "ditf_version": ditf_version(),
    }
    if output is not None:
        write_json_atomic(output, scores)
    return scores


def _check_predictions_complete(samples: list[Ade20kSample], predictions_dir: Path) -> None:
    missing = [f"{sample.stem}.png" for sample in samples if not (predictions_dir / f"{sample.stem}.png").is_file()]
    if missing:
        raise DatasetError(
            f"predictions folder {predictions_dir} lacks {len(missing)} of {len(samples)} predictions "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); write one <stem>.png per annotation "
            "(same stem as annotations/<split>/<stem>.png)."
        )


def read_prediction(path: Path, size: tuple[int, int], annotation: Path) -> np.ndarray:
    """(H, W) int64 predicted ids of `path`, checked to be `size` and within 0..150."""
    pred = read_label_png(path, "prediction")
    if pred.shape != tuple(size):
        raise DatasetError(
            f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} (WxH) but its annotation {annotation} is "
            f"{size[1]}x{size[0]}; write predictions at the annotation's size (upsample logits before the argmax, "
            "or resize the id map with nearest-neighbour)."
        )
    out_of_range = pred[(pred < 0) | (pred > ADE20K_NUM_CLASSES)]
    if out_of_range.size:
        worst = int(out_of_range.max()) if out_of_range.max() > ADE20K_NUM_CLASSES else int(out_of_range.min())
        raise DatasetError(
            f"prediction {path} contains id {worst}; predictions use the annotation convention, ids 1..150 "
            "(0 = no class). If your model outputs train ids 0..149, add 1 before saving; never write 255."
        )
    return pred
