"""Scoring a correspondence benchmark: predict every pair's target keypoints under a protocol, then PCK.

`score_pairs(dataset, source, protocol)` reads each image's feature map once (an LRU keeps the recent ones
and the prepared targets), predicts target by target (each target is prepared once for all its pairs), and
returns the results dictionary. On a GPU the exact matcher runs there (`device=`); on the CPU every process
scores with one torch thread unless told otherwise, and the pairs can be spread over `workers` processes,
which scales where splitting the small float64 products over threads does not (on a busy 2-core machine,
preparing a 3072-channel target took 0.04 s on one thread and 0.56 s on two). With a `Fusion`, each pair is
matched on DiTF maps fused with DINOv2 maps (`ditf.eval.feature_store.FusedScoringFeatures`).
"""

from __future__ import annotations

import math
import multiprocessing
from collections import defaultdict
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval.keypoints import CorrespondenceDataset, Frame, ImageRecord, KeypointPair
from ditf.eval.metrics import PairOutcome, bbox_threshold, point_errors, summarize
from ditf.eval.feature_store import SANITY_CHECKS, FusedScoringFeatures, Fusion, ScoringFeatures
from ditf.eval.protocol import Protocol
from ditf.eval.sources import FeatureSource
from ditf.features.fusion_settings import FusionSettings, check_fusion_dims
from ditf.features.io import load_features
from ditf.matching.correspondence import match_points_lowres, match_prepared, upsampled_vectors
from ditf.versions import ditf_version

__all__ = ["SANITY_CHECKS", "PairPrediction", "ScoringFeatures", "check_channels", "ensure_features", "predict_pair",
           "predict_pairs", "score_pairs", "scoring_threads", "torch_threads"]


@dataclass(frozen=True)
class PairPrediction:
    """Predicted target keypoints of one pair: `frame_points` (P, 2) in the protocol frame,
    `image_points` (P, 2) in original target pixels, `outcome` the errors and threshold."""

    frame_points: np.ndarray
    image_points: np.ndarray
    outcome: PairOutcome


AnyFeatures = Union[ScoringFeatures, FusedScoringFeatures]


def predict_pair(pair: KeypointPair, store: AnyFeatures, protocol: Protocol) -> PairPrediction:
    """Match `pair`'s source keypoints into its target under `protocol` and measure the errors; `store` gives
    the pair's maps (one source's, or fused with DINOv2)."""
    src_feats, trg_feats = store.pair_features(pair)
    src_frame = protocol.frame_for(pair.source)
    trg_frame = protocol.frame_for(pair.target)
    src_points = src_frame.to_frame(pair.source_points)
    if protocol.matcher == "upsampled":
        pixels = _floor_inside(src_points, src_frame.size)
        vectors = upsampled_vectors(src_feats, src_frame.size, torch.from_numpy(pixels))
        predicted = match_prepared(vectors, store.prepared_target(pair, trg_feats)).cpu().numpy().astype(np.float64)
    else:
        predicted = _patch_predictions(src_feats, trg_feats, src_points, src_frame, trg_frame)

    if protocol.threshold == "bbox":
        if pair.target_bbox is None:
            raise DatasetError(f"pair {pair.name} has no target bounding box; use --threshold image")
        threshold = bbox_threshold(pair.target_bbox) * trg_frame.scale
    else:
        threshold = float(max(trg_frame.size))
    truth = trg_frame.to_frame(pair.target_points)
    outcome = PairOutcome(pair.name, pair.category, point_errors(predicted, truth), threshold)
    return PairPrediction(predicted, trg_frame.from_frame(predicted), outcome)


def _floor_inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    pixels = np.floor(points).astype(np.int64)
    pixels[:, 0] = pixels[:, 0].clip(0, width - 1)
    pixels[:, 1] = pixels[:, 1].clip(0, height - 1)
    return pixels


def _patch_predictions(
    src_feats: torch.Tensor, trg_feats: torch.Tensor, src_points: np.ndarray, src_frame: Frame, trg_frame: Frame
) -> np.ndarray:
    _, src_h, src_w = src_feats.shape
    _, trg_h, trg_w = trg_feats.shape
    cells = np.stack(
        [np.floor(src_points[:, 0] * src_w / src_frame.size[1]), np.floor(src_points[:, 1] * src_h / src_frame.size[0])],
        axis=1,
    ).astype(np.int64)
    cells[:, 0] = cells[:, 0].clip(0, src_w - 1)
    cells[:, 1] = cells[:, 1].clip(0, src_h - 1)
    target_cells = match_points_lowres(src_feats, trg_feats, torch.from_numpy(cells)).numpy()
    stride_x, stride_y = trg_frame.size[1] / trg_w, trg_frame.size[0] / trg_h
    return np.stack(
        [target_cells[:, 0] * stride_x + math.floor(stride_x / 2), target_cells[:, 1] * stride_y + math.floor(stride_y / 2)],
        axis=1,
    )


def scoring_threads(threads: int | None, device: torch.device) -> int | None:
    """The torch threads a scoring process uses: `threads` if given, else one on the CPU (the (P, C) x (C, h*w)
    float64 products are too small to split between threads) and torch's setting elsewhere (None)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError(f"threads={threads!r} must be a whole number >= 1 (or None: one on the CPU).")
        return threads
    return 1 if device.type == "cpu" else None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: leave torch's setting), then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_file(paths: dict[str, Path], image: ImageRecord) -> torch.Tensor:
    return load_features(paths[image.key])[0]


def _file_store(paths: dict[str, Path], protocol: Protocol, allow: Collection[str]) -> ScoringFeatures:
    return ScoringFeatures(lambda image: _load_file(paths, image), protocol, where=lambda image: str(paths[image.key]),
                        allow=allow)


def _predict_chunk(pairs: list[KeypointPair], paths: dict[str, Path], protocol: Protocol, allow: Collection[str],
                   threads: int, fusion: FusionSettings | None = None,
                   fusion_paths: dict[str, Path] | None = None) -> dict[str, PairPrediction]:
    """A worker's share: its pairs' predictions, reading maps from their files, on `threads` CPU threads (the
    DINOv2 maps from `fusion_paths` too, fused with `fusion`, when given)."""
    torch.set_num_threads(threads)
    store: AnyFeatures = _file_store(paths, protocol, allow)
    if fusion is not None and fusion_paths is not None:
        store = FusedScoringFeatures(store, _file_store(fusion_paths, protocol, allow), fusion)
    return {pair.name: predict_pair(pair, store, protocol) for pair in pairs}


def _source_store(source: FeatureSource, protocol: Protocol, device: torch.device,
                  allow: Collection[str]) -> ScoringFeatures:
    return ScoringFeatures(source.load, protocol, device, where=lambda image: str(source.path_for(image)), allow=allow)


def _target_groups(pairs: list[KeypointPair]) -> list[list[KeypointPair]]:
    """`pairs` grouped by target image (its prepared target is reused within a group), largest group first."""
    by_target: dict[str, list[KeypointPair]] = defaultdict(list)
    for pair in pairs:
        by_target[pair.target.key].append(pair)
    return sorted(by_target.values(), key=len, reverse=True)


def _chunks_by_target(pairs: list[KeypointPair], count: int) -> list[list[KeypointPair]]:
    """`pairs` in about `count` chunks that keep each target's pairs together (its prepared target is reused)."""
    groups = _target_groups(pairs)
    chunks: list[list[KeypointPair]] = [[] for _ in range(max(1, min(count, len(groups))))]
    for group in groups:
        min(chunks, key=len).extend(group)
    return [chunk for chunk in chunks if chunk]


def predict_pairs(dataset: CorrespondenceDataset, source: FeatureSource, protocol: Protocol, *, workers: int = 1,
                  device: torch.device | str = "cpu", threads: int | None = None, allow: Collection[str] = (),
                  fusion: Fusion | None = None, progress: bool = True) -> dict[str, PairPrediction]:
    """Every pair's prediction, by pair name, in dataset order (computed target by target).

    `workers` > 1 spreads pairs over that many processes reading the maps from their files (CPU only), whole
    targets to a process; otherwise pairs are matched here, on `device`. Each process uses `threads` torch
    threads; None: one on the CPU (more threads only slow the small float64 products down, badly so on a busy
    machine: use workers to use more cores), torch's setting on a GPU. Torch's setting is restored afterwards.
    `allow` switches off `SANITY_CHECKS` of the maps. With `fusion`, each pair is matched on its DiTF maps
    fused with its DINOv2 maps from `fusion.source` (`ditf.features.fusion`).
    """
    unknown = sorted(set(allow) - set(SANITY_CHECKS))
    if unknown:
        raise InvalidArgumentError(f"allow={unknown}: the checks that can be switched off are {', '.join(SANITY_CHECKS)}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgumentError(f"workers={workers!r} must be a whole number >= 1.")
    device = torch.device(device)
    threads = scoring_threads(threads, device)
    if workers > 1 and device.type != "cpu":
        raise InvalidArgumentError(f"workers={workers} spreads scoring over CPU processes; with device={device} use "
                                   "workers=1 (the GPU already runs the pairs in parallel).")
    if workers == 1:
        store: AnyFeatures = _source_store(source, protocol, device, allow)
        if fusion is not None:
            store = FusedScoringFeatures(store, _source_store(fusion.source, protocol, device, allow), fusion.settings)
        by_target = [pair for group in _target_groups(list(dataset.pairs)) for pair in group]
        with torch_threads(threads):
            found = {pair.name: predict_pair(pair, store, protocol)
                     for pair in tqdm(by_target, desc="matching", disable=not progress)}
    else:
        paths = {image.key: source.path_for(image) for image in dataset.images()}
        fusion_paths = None if fusion is None else {image.key: fusion.source.path_for(image)
                                                    for image in dataset.images()}
        chunks = _chunks_by_target(list(dataset.pairs), 4 * workers)
        found = {}
        context = _worker_context()
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool, \
                tqdm(total=len(dataset.pairs), desc=f"matching ({workers} workers)", disable=not progress) as bar:
            futures = [pool.submit(_predict_chunk, chunk, paths, protocol, tuple(allow), threads or 1,
                                   fusion.settings if fusion else None, fusion_paths) for chunk in chunks]
            for future in as_completed(futures):
                done = future.result()
                found.update(done)
                bar.update(len(done))
    return {pair.name: found[pair.name] for pair in dataset.pairs}


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (POSIX, CUDA not initialised here: workers start at once, as DataLoader's do), else
    spawn (a fresh interpreter per worker)."""
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def check_channels(images: list[ImageRecord], source: FeatureSource) -> None:
    """DatasetError unless every image's map (checked from its header) has the same channel count."""
    first: tuple[ImageRecord, int] | None = None
    for image in images:
        channels = source.inspect(image)[0]
        if first is None:
            first = (image, channels)
        elif channels != first[1]:
            raise DatasetError(
                f"features of {image.key} ({source.path_for(image)}) have {channels} channels but those of "
                f"{first[0].key} ({source.path_for(first[0])}) have {first[1]}; extract every image with the same "
                "model and settings (delete the odd file, or the cache entry, and extract it again)"
            )


def ensure_features(images: list[ImageRecord], source: FeatureSource, progress: bool = True) -> int:
    """Make sure `source` has features for every image; extract missing ones if it can.

    Returns how many were extracted. DatasetError listing the missing count when the source cannot
    compute (a features folder, or a cache-only scoring step after sharded extraction).
    """
    missing = [image for image in tqdm(images, desc="checking features", disable=not progress, leave=False)
               if not source.available(image)]
    if missing and not source.can_compute:
        examples = ", ".join(image.key for image in missing[:3])
        raise DatasetError(f"{len(missing)} of {len(images)} images have no features (e.g. {examples}); {source.missing_hint}")
    for image in tqdm(missing, desc="extracting features", disable=not progress):
        source.load(image)
    check_channels(images, source)
    return len(missing)


def score_pairs(dataset: CorrespondenceDataset, source: FeatureSource, protocol: Protocol, *,
                settings: dict | None = None, workers: int = 1, device: torch.device | str = "cpu",
                threads: int | None = None, allow: Collection[str] = (), fusion: Fusion | None = None,
                progress: bool = True) -> dict:
    """Score `dataset` with features from `source` under `protocol` (extracting missing maps first), fused per
    pair with the DINOv2 maps of `fusion` when given. `workers`, `device` and `threads` say where the pairs are
    matched (`predict_pairs`): on the CPU one torch thread per process unless `threads` asks for more, and
    `workers` processes to use more cores.

    Returns the results dictionary: `per_category` {category: {per_image, per_point, pairs,
    points}}, `all_per_image`, `all_per_point`, `mean_per_image`, `mean_per_point` (percent, at
    the protocol's first alpha), `by_alpha` (the other alphas), `protocol` (the card, with the fusion card
    under "fusion"), `settings` (with the fusion parameters and DINOv2 source under "fusion"),
    `benchmark`, `ditf_version` and `pairs` {pair name: {category, pred_trg_kps (original target
    pixels), correct, total}}.
    """
    ensure_features(dataset.images(), source, progress)
    if fusion is not None:
        ensure_features(dataset.images(), fusion.source, progress)
        first = dataset.images()[0]
        check_fusion_dims(fusion.settings, source.inspect(first)[0], fusion.source.inspect(first)[0],
                          str(source.path_for(first)), str(fusion.source.path_for(first)))
    predictions = predict_pairs(dataset, source, protocol, workers=workers, device=device, threads=threads,
                                allow=allow, fusion=fusion, progress=progress)
    outcomes = [prediction.outcome for prediction in predictions.values()]
    main_alpha, other_alphas = protocol.alphas[0], protocol.alphas[1:]
    results = {"benchmark": dataset.describe(), "alpha": main_alpha}
    results.update(summarize(outcomes, dataset.categories, main_alpha, protocol.rule))
    results["by_alpha"] = {str(alpha): summarize(outcomes, dataset.categories, alpha, protocol.rule)
                           for alpha in other_alphas}
    results["protocol"] = protocol.card()
    results["settings"] = dict(settings or {})
    if fusion is not None:
        results["protocol"]["fusion"] = fusion.settings.card()
        results["settings"]["fusion"] = fusion.describe()
    results["ditf_version"] = ditf_version()
    integer_frame = protocol.frame == "original"
    results["pairs"] = {
        name: {
            "category": prediction.outcome.category,
            "pred_trg_kps": (prediction.image_points.astype(np.int64).tolist() if integer_frame
                             else np.round(prediction.image_points, 3).tolist()),
            "correct": int(prediction.outcome.correct(main_alpha, protocol.rule).sum()),
            "total": int(prediction.outcome.errors.shape[0]),
        }
        for name, prediction in predictions.items()
    }
    return results
