"""Library-first ADE20K segmentation transfer: `evaluate_ade20k` (train, predict, score) and `score_segmentation`.

    from ditf.eval import DiTFExtractor, evaluate_ade20k, score_segmentation
    results = evaluate_ade20k("ADEChallengeData2016", "seg/", extractor=DiTFExtractor("flux-dev", task="ade20k"))
    scores = score_segmentation("ADEChallengeData2016", "seg/pred/")          # any predictions, mmseg semantics

Features come from `features` (maps `DIR/<split>/<stem>.safetensors`) or `extractor`, through the content-
addressed feature cache; the probe reads them from there image by image (never all in memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditf.eval.ade20k import load_ade20k
from ditf.eval.api import feature_source, settings_sources
from ditf.eval.extractors import DiTFExtractor, default_device
from ditf.eval.keypoints import ImageRecord, image_size
from ditf.eval.probe_settings import HEADS, ProbeSettings
from ditf.eval.scoring import ensure_features
from ditf.eval.segmentation_metrics import score_segmentation
from ditf.eval.segmentation_probe import StepCallback, run_probe
from ditf.eval.sharding import extract_shard_of
from ditf.eval.sources import Extractor, FeatureFolder
from ditf.errors import InvalidArgumentError

__all__ = ["evaluate_ade20k", "score_segmentation"]


def evaluate_ade20k(root: str | Path, output: str | Path, *, features: str | Path | None = None,
                    extractor: Extractor | str | None = None, probe: str = "linear",
                    probe_settings: ProbeSettings | Mapping[str, Any] | None = None, train_split: str = "training",
                    eval_split: str = "validation", cache_dir: str | Path | None = None, cache_only: bool = False,
                    cache_dtype: str | None = None, shard: str | tuple[int, int] | None = None,
                    device: str | None = None, progress: bool = True,
                    on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train a probe on frozen features of ADE20K `train_split`, predict `eval_split`, score it (mIoU).

    Args:
        root: the folder holding ADEChallengeData2016/ (or that folder).
        output: the run folder: train/ (checkpoint.pt, loss_history.json, loss_curve.png), pred/<stem>.png
            (ids 1..150, the annotation convention), scores.json, class_iou.png, results.json. A killed run
            resumes from the checkpoint and the written predictions; a folder of another run is refused.
        features: a folder of maps `<split>/<stem>.safetensors` (tensor `features`, (C, h, w), whole image); or
        extractor: an `Extractor` (a model reference becomes `DiTFExtractor(model, task="ade20k")`), behind the
            feature cache (`cache_dir`, `cache_only`, `cache_dtype`); every image is extracted before training.
        probe: the head, one of `HEADS`: "linear" (DINOv2's BatchNorm + 1x1 conv), "linear_no_bn", "mlp".
        probe_settings: `ProbeSettings` or a mapping of its fields (default: DINOv2's linear protocol, 40k steps
            of 16 images); `probe` sets its head.
        shard: "i/n" or "auto": only fill the feature cache for that share of both splits' images and return
            its summary.
        device: where the probe trains (default: the extractor's GPU, else CUDA when available, else CPU).
        on_step: called as on_step(completed_steps, loss) after every optimizer step.

    Returns:
        {"scores": `score_segmentation` dict (aAcc, mIoU, mAcc, per_class), "training", "features" (the
        feature source), "probe_card", "files"}, also written to `output/results.json`.
    """
    if probe not in HEADS:
        raise InvalidArgumentError(f"probe={probe!r} is not a probe head; choose one of {', '.join(HEADS)}.")
    base = probe_settings if isinstance(probe_settings, ProbeSettings) else ProbeSettings(**dict(probe_settings or {}))
    settings = replace(base, head=probe)
    samples = {split: load_ade20k(root, split) for split in dict.fromkeys((train_split, eval_split))}
    if isinstance(extractor, str):
        extractor = DiTFExtractor(extractor, task="ade20k")
    if features is not None:
        given = [name for name, value in (("cache_dir", cache_dir), ("cache_only", cache_only),
                                          ("cache_dtype", cache_dtype), ("shard", shard)) if value]
        if extractor is not None or given:
            raise InvalidArgumentError(f"features={str(features)!r} reads precomputed maps; "
                                       f"{'extractor=' if extractor is not None else ', '.join(given)} only apply "
                                       "to an extractor: pass one of them.")
        source = FeatureFolder(features, group="split", flat=False)
    else:
        source = feature_source(extractor=extractor, cache_dir=cache_dir, cache_only=cache_only,
                                cache_dtype=cache_dtype)
    records = {sample.image: ImageRecord(sample.image, split, image_size(sample.image))
               for split, split_samples in samples.items() for sample in split_samples}
    if shard is not None:
        return extract_shard_of(list(records.values()), source, shard, progress)
    ensure_features(list(records.values()), source, progress)
    feature_record = {**{key: value for key, value in source.describe().items() if key != "cache"},
                      **settings_sources(extractor)}

    def features_for(image: Path) -> Any:
        return source.load(records[Path(image)])

    return run_probe(root, features_for, output, settings=settings, feature_record=feature_record,
                     train_split=train_split, eval_split=eval_split, device=device or _probe_device(extractor),
                     progress=progress, on_step=on_step)


def _probe_device(extractor: Extractor | None) -> str:
    """The extractor's device when it is a GPU, else the default device (CUDA when available)."""
    device = str(getattr(extractor, "device", ""))
    return device if device.startswith("cuda") else default_device()
