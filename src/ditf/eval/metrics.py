"""PCK (percentage of correct keypoints): per pair, per category, pooled and category-mean.

A keypoint is correct when its error (Euclidean distance in the protocol's frame, pixels) is within
alpha times the pair's threshold length (target bbox max side, or image max side). Two comparison
rules exist in the literature and are kept exactly:

* `"<="` (DIFT, DiTF `eval_spair.py`, SPair devkit): `error / threshold <= alpha`
* `"<"` (SD-DINO, GeoAware-SC): `error < alpha * threshold`

Averaging: *per image* = mean over pairs of each pair's fraction of correct points; *per point* =
correct points / all points. *all_* pools every pair; *mean_* averages the per-category scores with
equal weight. Scores are percentages: per image as DiTF's script computes it (mean of fractions,
times 100), per point as 100 * correct / total (one rounding); both reproduce the reference
fixtures bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ditf.errors import InvalidArgumentError

COMPARISON_RULES = ("<=", "<")


@dataclass(frozen=True)
class PairOutcome:
    """Errors of one pair: `errors` (P,) float64 pixels in the protocol frame; `threshold` pixels."""

    name: str
    category: str
    errors: np.ndarray
    threshold: float

    def correct(self, alpha: float, rule: str) -> np.ndarray:
        """(P,) bool: which keypoints are correct at `alpha` under the comparison `rule`."""
        return correct_mask(self.errors, self.threshold, alpha, rule)


def point_errors(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean distances (P,) float64 between (P, 2) predicted and true (x, y) points."""
    delta = np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return np.sqrt(delta[:, 0] ** 2 + delta[:, 1] ** 2)


def correct_mask(errors: np.ndarray, threshold: float, alpha: float, rule: str) -> np.ndarray:
    """(P,) bool under `rule` "<=" (error / threshold <= alpha) or "<" (error < alpha * threshold)."""
    if rule == "<=":
        return errors / threshold <= alpha
    if rule == "<":
        return errors < alpha * threshold
    raise InvalidArgumentError(f"comparison rule must be one of {COMPARISON_RULES}, got {rule!r}")


def bbox_threshold(bbox: tuple[float, float, float, float]) -> float:
    """max(x2 - x1, y2 - y1) of a corner box (x1, y1, x2, y2), in pixels."""
    x1, y1, x2, y2 = bbox
    return max(y2 - y1, x2 - x1)


def summarize(outcomes: list[PairOutcome], categories: list[str], alpha: float, rule: str) -> dict:
    """PCK at one alpha, in percent.

    Returns {"per_category": {cat: {"per_image", "per_point", "pairs", "points"}}, "all_per_image",
    "all_per_point", "mean_per_image", "mean_per_point"}. Categories without pairs are skipped.
    """
    by_category: dict[str, list[PairOutcome]] = {category: [] for category in categories}
    for outcome in outcomes:
        by_category.setdefault(outcome.category, []).append(outcome)

    per_category = {}
    all_fractions: list[float] = []
    all_correct = all_total = 0
    mean_image_sum = mean_point_sum = 0.0
    for category, group in by_category.items():
        if not group:
            continue
        fractions = []
        cat_correct = cat_total = 0
        for outcome in group:
            correct = int(outcome.correct(alpha, rule).sum())
            total = int(outcome.errors.shape[0])
            fractions.append(correct / total)
            cat_correct += correct
            cat_total += total
        per_image = float(np.mean(fractions)) * 100
        per_point = 100 * cat_correct / cat_total
        per_category[category] = {"per_image": per_image, "per_point": per_point, "pairs": len(group), "points": cat_total}
        all_fractions.extend(fractions)
        all_correct += cat_correct
        all_total += cat_total
        mean_image_sum = mean_image_sum + per_image
        mean_point_sum = mean_point_sum + per_point

    if not per_category:
        raise InvalidArgumentError("no pairs to score; check the split, the categories and the filters")
    return {
        "per_category": per_category,
        "all_per_image": float(np.mean(all_fractions)) * 100,
        "all_per_point": 100 * all_correct / all_total,
        "mean_per_image": mean_image_sum / len(per_category),
        "mean_per_point": mean_point_sum / len(per_category),
    }
