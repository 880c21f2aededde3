"""Benchmarks: keypoint correspondence (SPair-71k, PF-Pascal, AP-10K; optionally fused with DINOv2), DAVIS-2017
label propagation, HPatches homography estimation and ADE20K segmentation transfer.

One keyword function per benchmark returns the results dict the command line writes (`evaluate_spair`,
`evaluate_pfpascal`, `evaluate_ap10k`, `evaluate_davis`, `score_davis`, `evaluate_hpatches`, `evaluate_ade20k`,
`score_segmentation`); `DiTFExtractor` turns a model and its `FeatureSettings` into features for them. Names are
imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ditf.lazy import lazy_exports

_EXPORTS = {
    "evaluate_spair": "ditf.eval.api",
    "evaluate_pfpascal": "ditf.eval.api",
    "evaluate_ap10k": "ditf.eval.api",
    "evaluate_davis": "ditf.eval.api",
    "evaluate_correspondence": "ditf.eval.api",
    "feature_source": "ditf.eval.api",
    "score_davis": "ditf.eval.davis",
    "evaluate_hpatches": "ditf.eval.api_hpatches",
    "evaluate_ade20k": "ditf.eval.api_segmentation",
    "score_segmentation": "ditf.eval.segmentation_metrics",
    "ProbeSettings": "ditf.eval.probe_settings",
    "FusionSettings": "ditf.features.fusion_settings",
    "DiTFExtractor": "ditf.eval.extractors",
    "default_cache_dir": "ditf.eval.extractors",
    "FeatureFolder": "ditf.eval.sources",
    "CachedExtractor": "ditf.eval.sources",
    "write_results": "ditf.eval.report",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from ditf.eval.api import (
        evaluate_ap10k,
        evaluate_correspondence,
        evaluate_davis,
        evaluate_pfpascal,
        evaluate_spair,
        feature_source,
    )
    from ditf.eval.api_hpatches import evaluate_hpatches
    from ditf.eval.api_segmentation import evaluate_ade20k
    from ditf.eval.davis import score_davis
    from ditf.eval.extractors import DiTFExtractor, default_cache_dir
    from ditf.eval.probe_settings import ProbeSettings
    from ditf.eval.report import write_results
    from ditf.eval.segmentation_metrics import score_segmentation
    from ditf.eval.sources import CachedExtractor, FeatureFolder
    from ditf.features.fusion_settings import FusionSettings


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
