"""Library-first evaluation: one keyword function per benchmark, returning the dict the command line writes.

    from ditf.eval import DiTFExtractor, evaluate_spair
    results = evaluate_spair("SPair-71k", extractor=DiTFExtractor("flux-dev", task="spair"))
    results = evaluate_spair("SPair-71k", features="my_feats/")          # precomputed maps

    results = evaluate_spair("SPair-71k", extractor=DiTFExtractor("flux-dev", task="spair"),
                             fuse="dinov2-b14")                      # fused with DINOv2 per pair (the paper's †)

Features come from exactly one of `features` (a folder of precomputed maps) and `extractor` (a
`DiTFExtractor`, a baseline from `ditf.baselines`, or any `Extractor`), the latter behind the content-
addressed feature cache. `fuse` (a DINOv2 baseline name or an `Extractor`, cached too) or `fuse_features` (a
folder of DINOv2 maps) fuses them per pair (`ditf.features.fusion`, parameters in `fusion`). `shard` fills the
cache for a share of the images and returns the shard summary instead of results; `workers` spreads CPU scoring
over processes; `device` runs the exact matcher on a GPU. HPatches and ADE20K: `ditf.eval.api_hpatches`,
`ditf.eval.api_segmentation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.eval.feature_store import Fusion
from ditf.eval.keypoints import CorrespondenceDataset
from ditf.eval.protocol import protocol_for
from ditf.eval.scoring import score_pairs
from ditf.eval.sharding import extract_shard
from ditf.eval.prompts import PromptPolicy, load_captions
from ditf.eval.sources import CachedExtractor, Extractor, FeatureFolder, FeatureSource
from ditf.eval.extractors import DiTFExtractor, SquarePadded, default_cache_dir, default_device
from ditf.features.fusion_settings import FUSABLE_BASELINES, FusionSettings
from ditf.settings import task_protocol
from ditf.registry import preset_for

StorageDtype = str  # "float32" | "float16" | "bfloat16"


def feature_source(*, features: str | Path | None = None, extractor: Extractor | None = None,
                   frame_pad: int | None = None, prompt_mode: str | None = None, captions: str | Path | None = None,
                   cache_dir: str | Path | None = None, cache_only: bool = False,
                   cache_dtype: StorageDtype | None = None) -> FeatureSource:
    """The feature source of a correspondence benchmark: `features` (a folder) or `extractor` (cached).

    frame_pad: feed the extractor GeoAware-SC's zero-padded square images of this side (their protocol).
    prompt_mode: "empty", "class" or "caption" (with `captions`, the DiTF authors' JSON); default: the
    extractor's own. The cache lives in `cache_dir` (default `default_cache_dir()`), maps stored in
    `cache_dtype`; `cache_only` never runs the extractor.
    """
    if (features is None) == (extractor is None):
        raise InvalidArgumentError(
            "pass exactly one of features=DIR (precomputed maps) and extractor=... (e.g. DiTFExtractor('flux-dev'), "
            f"or a baseline); got {'both' if features is not None else 'neither'}."
        )
    if features is not None:
        given = [name for name, value in (("cache_dir", cache_dir), ("cache_only", cache_only),
                                          ("cache_dtype", cache_dtype), ("prompt_mode", prompt_mode)) if value]
        if given:
            raise InvalidArgumentError(f"{', '.join(given)} only apply to an extractor, not to features={str(features)!r}.")
        return FeatureFolder(features)
    mode = prompt_mode or extractor.prompt_mode
    if mode == "caption" and captions is None:
        raise InvalidArgumentError("prompt mode 'caption' needs captions=FILE (the DiTF authors' JSON format).")
    prompts = PromptPolicy(mode, load_captions(captions) if mode == "caption" else None)
    if frame_pad is not None:
        extractor = SquarePadded(extractor, frame_pad)
    storage = getattr(torch, cache_dtype) if cache_dtype else None
    return CachedExtractor(extractor, cache_dir or default_cache_dir(), prompts, storage, cache_only)


def evaluate_correspondence(dataset: CorrespondenceDataset, *, features: str | Path | None = None,
                            extractor: Extractor | None = None, protocol: str = "ditf", threshold: str | None = None,
                            matcher: str | None = None, pad_size: int | None = None,
                            alphas: Sequence[float] | None = None, prompt_mode: str | None = None,
                            captions: str | Path | None = None, cache_dir: str | Path | None = None,
                            cache_only: bool = False, cache_dtype: StorageDtype | None = None,
                            shard: str | tuple[int, int] | None = None, workers: int = 1,
                            threads: int | None = None, device: str | torch.device | None = None,
                            allow: Sequence[str] = (),
                            fuse: str | Extractor | None = None, fuse_features: str | Path | None = None,
                            fusion: FusionSettings | Mapping[str, Any] | None = None,
                            progress: bool = True) -> dict[str, Any]:
    """Score a loaded correspondence `dataset` (see `evaluate_spair` for the options); `shard` returns the shard
    summary instead of results."""
    chosen = protocol_for(dataset, protocol, threshold, matcher, pad_size, tuple(alphas) if alphas else None)
    frame_pad = chosen.pad_size if chosen.frame == "square_pad" else None
    cache = dict(cache_dir=cache_dir, cache_only=cache_only, cache_dtype=cache_dtype)
    source = feature_source(features=features, extractor=extractor, frame_pad=frame_pad, prompt_mode=prompt_mode,
                            captions=captions, **(cache if features is None or fuse is None else {}))
    fused = fusion_with(fuse=fuse, fuse_features=fuse_features, fusion=fusion, frame_pad=frame_pad,
                        cache_dir=cache_dir, cache_only=cache_only, cache_dtype=cache_dtype,
                        device=_extraction_device(extractor))
    if shard is not None:
        fillable = [s for s in (source, fused.source if fused else None) if s is not None and s.can_compute]
        if not fillable:
            raise InvalidArgumentError("shard applies to an extractor (it fills the feature cache), not to features=.")
        summaries = [extract_shard(dataset, fill, shard, progress) for fill in fillable]
        summary = dict(summaries[0])
        for extra in summaries[1:]:  # the DINOv2 side of a fused run
            summary["fuse_extracted"] = extra["extracted"]
            summary["missing_in_dataset"] += extra["missing_in_dataset"]
        return summary
    results = score_pairs(dataset, source, chosen, settings=source.describe(), workers=workers, threads=threads,
                          device=device if device is not None else _scoring_device(extractor, workers), allow=allow,
                          fusion=fused, progress=progress)
    return {**results, **settings_sources(extractor)}


def fusion_with(*, fuse: str | Extractor | None = None, fuse_features: str | Path | None = None,
                fusion: FusionSettings | Mapping[str, Any] | None = None, frame_pad: int | None = None,
                cache_dir: str | Path | None = None, cache_only: bool = False,
                cache_dtype: StorageDtype | None = None, device: str | None = None) -> Fusion | None:
    """The DINOv2 side of a fused evaluation, or None without `fuse` / `fuse_features`.

    fuse: a name in `FUSABLE_BASELINES` (loaded on `device` when first needed) or any `Extractor`, behind the
    feature cache (`cache_dir`, `cache_only`, `cache_dtype`, as the DiTF side); fuse_features: a folder of
    precomputed DINOv2 maps `<group>/<stem>.safetensors`. fusion: `FusionSettings` or a mapping of its fields
    (default: SD-DINO's weights and normalisation, DiTF reduced to 512 by PCA, DINOv2 whole).
    """
    if fuse is None and fuse_features is None:
        if fusion is not None:
            raise InvalidArgumentError("fusion settings were given without fuse=: pass fuse='dinov2-b14' (or "
                                       "fuse_features=DIR) to fuse, or drop fusion=.")
        return None
    if fuse is not None and fuse_features is not None:
        raise InvalidArgumentError(f"pass one of fuse={fuse!r} (extract DINOv2 features) and fuse_features="
                                   f"{str(fuse_features)!r} (precomputed DINOv2 maps), not both.")
    if isinstance(fuse, str):
        if fuse not in FUSABLE_BASELINES:
            raise InvalidArgumentError(f"fuse={fuse!r} is not a DINOv2 baseline; use one of "
                                       f"{', '.join(FUSABLE_BASELINES)} (or pass an Extractor).")
        from ditf.baselines import BaselineExtractor

        fuse = BaselineExtractor(fuse, device=device)
    settings = fusion if isinstance(fusion, FusionSettings) else FusionSettings(**dict(fusion or {}))
    if fuse_features is not None:
        return Fusion(FeatureFolder(fuse_features), settings)
    source = feature_source(extractor=fuse, frame_pad=frame_pad, cache_dir=cache_dir, cache_only=cache_only,
                            cache_dtype=cache_dtype)
    return Fusion(source, settings)


def _extraction_device(extractor: Extractor | None) -> str:
    """Where a baseline fused with `extractor` runs: the extractor's device, else the default device."""
    device = getattr(extractor, "device", None)
    return str(device) if device is not None else default_device()


def settings_sources(extractor: Extractor | None) -> dict[str, Any]:
    """{"settings_sources": where each setting comes from} for an extractor with `FeatureSettings`, else {}."""
    sources = getattr(getattr(extractor, "settings", None), "sources", None)
    return {"settings_sources": dict(sources)} if sources else {}


def _scoring_device(extractor: Extractor | None, workers: int = 1) -> str:
    """Where the exact matcher runs by default: the extractor's GPU when it has one (and the pairs are not spread
    over CPU worker processes), else the CPU."""
    device = str(getattr(extractor, "device", "cpu"))
    return device if device.startswith("cuda") and workers == 1 else "cpu"


def evaluate_spair(root: str | Path, *, features: str | Path | None = None, extractor: Extractor | None = None,
                   split: str = "test", categories: Sequence[str] | None = None,
                   filters: Mapping[str, set[int]] | None = None, layout: str | None = None, protocol: str = "ditf",
                   threshold: str | None = None, matcher: str | None = None, pad_size: int | None = None,
                   prompt_mode: str | None = None, captions: str | Path | None = None,
                   cache_dir: str | Path | None = None, cache_only: bool = False, cache_dtype: StorageDtype | None = None,
                   shard: str | tuple[int, int] | None = None, workers: int = 1, threads: int | None = None,
                   device: str | torch.device | None = None, allow: Sequence[str] = (),
                   fuse: str | Extractor | None = None, fuse_features: str | Path | None = None,
                   fusion: FusionSettings | Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """PCK on SPair-71k: the results dict `ditf eval spair` writes (`ditf.eval.scoring.score_pairs` documents it).

    root: the SPair-71k folder; split: "test", "val" or "trn"; categories, filters (variation flag -> allowed
    values), layout ("large", "small", ...): which pairs. protocol: "ditf" (the DiTF authors' eval_spair.py) or
    "geoaware" (GeoAware-SC), with threshold ("bbox" or "image"), matcher ("upsampled" or "patch") and pad_size
    overrides. Features: see `feature_source`. shard "i/n" or "auto": fill the cache for that share of the images
    and return its summary. workers: CPU scoring processes. threads: torch threads of each (default: one on the
    CPU, where more only slow the matcher down; torch's setting on a GPU). device: where the matcher runs (default:
    the extractor's GPU, else the CPU). allow: feature-map checks to switch off ("constant", "aspect"). fuse,
    fuse_features, fusion: fuse each pair with DINOv2 features (`fusion_with`; the paper's † rows); the results'
    settings and protocol card then hold the fusion parameters under "fusion".
    """
    from ditf.eval.spair import load_spair

    dataset = load_spair(root, split, list(categories) if categories else None, dict(filters) if filters else None,
                         layout)
    return evaluate_correspondence(dataset, features=features, extractor=extractor, protocol=protocol,
                                   threshold=threshold, matcher=matcher, pad_size=pad_size, prompt_mode=prompt_mode,
                                   captions=captions, cache_dir=cache_dir, cache_only=cache_only,
                                   cache_dtype=cache_dtype, shard=shard, workers=workers, threads=threads,
                                   device=device, allow=allow, fuse=fuse, fuse_features=fuse_features, fusion=fusion,
                                   progress=progress)


def evaluate_pfpascal(root: str | Path, *, features: str | Path | None = None, extractor: Extractor | None = None,
                      split: str = "test", categories: Sequence[str] | None = None, protocol: str = "ditf",
                      threshold: str | None = None, matcher: str | None = None, pad_size: int | None = None,
                      prompt_mode: str | None = None, captions: str | Path | None = None,
                      cache_dir: str | Path | None = None, cache_only: bool = False,
                      cache_dtype: StorageDtype | None = None, shard: str | tuple[int, int] | None = None,
                      workers: int = 1, threads: int | None = None, device: str | torch.device | None = None,
                      allow: Sequence[str] = (), fuse: str | Extractor | None = None,
                      fuse_features: str | Path | None = None,
                      fusion: FusionSettings | Mapping[str, Any] | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """PCK on PF-Pascal (image-size thresholds, alphas 0.1/0.05/0.15 by default); options as `evaluate_spair`."""
    from ditf.eval.pfpascal import load_pfpascal

    dataset = load_pfpascal(root, split, list(categories) if categories else None, with_boxes=threshold == "bbox")
    return evaluate_correspondence(dataset, features=features, extractor=extractor, protocol=protocol,
                                   threshold=threshold, matcher=matcher, pad_size=pad_size, prompt_mode=prompt_mode,
                                   captions=captions, cache_dir=cache_dir, cache_only=cache_only,
                                   cache_dtype=cache_dtype, shard=shard, workers=workers, threads=threads,
                                   device=device, allow=allow, fuse=fuse, fuse_features=fuse_features, fusion=fusion,
                                   progress=progress)


def evaluate_ap10k(root: str | Path, *, features: str | Path | None = None, extractor: Extractor | None = None,
                   subset: str = "intra-species", split: str = "test", categories: Sequence[str] | None = None,
                   protocol: str = "ditf", threshold: str | None = None, matcher: str | None = None,
                   pad_size: int | None = None, prompt_mode: str | None = None, captions: str | Path | None = None,
                   cache_dir: str | Path | None = None, cache_only: bool = False,
                   cache_dtype: StorageDtype | None = None, shard: str | tuple[int, int] | None = None,
                   workers: int = 1, threads: int | None = None, device: str | torch.device | None = None,
                   allow: Sequence[str] = (), fuse: str | Extractor | None = None,
                   fuse_features: str | Path | None = None,
                   fusion: FusionSettings | Mapping[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """PCK on AP-10K (GeoAware-SC's pairs): subset "intra-species", "cross-species" or "cross-family"; options as
    `evaluate_spair`."""
    from ditf.eval.ap10k import load_ap10k

    dataset = load_ap10k(root, subset, split, list(categories) if categories else None)
    return evaluate_correspondence(dataset, features=features, extractor=extractor, protocol=protocol,
                                   threshold=threshold, matcher=matcher, pad_size=pad_size, prompt_mode=prompt_mode,
                                   captions=captions, cache_dir=cache_dir, cache_only=cache_only,
                                   cache_dtype=cache_dtype, shard=shard, workers=workers, threads=threads,
                                   device=device, allow=allow, fuse=fuse, fuse_features=fuse_features, fusion=fusion,
                                   progress=progress)


def evaluate_davis(root: str | Path, output: str | Path, *, extractor: DiTFExtractor | str, split: str = "val",
                   sequences: Sequence[str] | None = None, short_side: int | None = None,
                   size_multiple: int | None = None, n_last_frames: int | None = None,
                   neighborhood_radius: int | None = None, topk: int | None = None, temperature: float | None = None,
                   scores: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """DAVIS-2017 label propagation with DiT features, then J&F: the scores dict `ditf eval davis` writes.

    extractor: a `DiTFExtractor` (or a model reference, resolved with the model's DAVIS task preset); its
    settings' image size is replaced per frame by the frame-size rule (`short_side` px, long side floored to
    `size_multiple`). Propagation: the first frame plus `n_last_frames` previous frames, a window of
    `neighborhood_radius` feature cells, `topk` neighbours per cell, softmax `temperature`. Every option left
    None comes from the model's DAVIS task preset (DiTF's 960, 32, 7, 12, 5, 0.1). Results PNGs go to
    `output/<seq>/<frame>.png` (a killed run resumes); the scores are written to `scores` (default
    `output/jf.json`).
    """
    from ditf.eval.davis import davis_frame_size, run_davis, score_davis
    from ditf.io import write_json_atomic
    from ditf.matching.propagation import PropagationSettings

    if isinstance(extractor, str):
        extractor = DiTFExtractor(extractor, task="davis")
    protocol = task_protocol(preset_for(extractor.model), "davis", short_side=short_side, size_multiple=size_multiple,
                             n_last_frames=n_last_frames, neighborhood_radius=neighborhood_radius, topk=topk,
                             temperature=temperature)
    davis_frame_size(1, 1, protocol["short_side"], protocol["size_multiple"])  # checks both before any model loads
    settings = PropagationSettings(protocol["n_last_frames"], protocol["neighborhood_radius"], protocol["topk"],
                                   protocol["temperature"])

    def extract(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
        return extractor.featurizer.extract(image_path, settings=extractor.settings.replace(size=size)).features

    record = {k: v for k, v in extractor.describe().items() if k not in ("resolution", "size")}
    output = Path(output)
    run_davis(root, extract, output, split=split, sequences=sequences, short_side=protocol["short_side"],
              size_multiple=protocol["size_multiple"], settings=settings, feature_record=record, progress=progress)
    result = score_davis(root, output, split, sequences=sequences, progress=progress)
    result["settings"] = {**record, "short_side": protocol["short_side"], "size_multiple": protocol["size_multiple"],
                          "n_last_frames": settings.n_last_frames, "neighborhood_radius": settings.neighborhood_radius,
                          "topk": settings.topk, "temperature": settings.temperature}
    result.update(settings_sources(extractor))
    write_json_atomic(scores or output / "jf.json", result)
    return result
