"""Massive activations in DiTs: record, measure, plot, and intervene during generation.

Analysis (pure tensors): `channel_stats`, `StatsTable`, detection rules (`RatioRule`, `SunRule`,
`TopKRule`), channel sets and Jaccard stability, `adaln_alignment`, `cluster_massive_tokens`, plots
and scan reports. Model side: `intervene(pipe, [Record(...), Zero(...), Transport(...),
DetailGuidance(...)])` hooks any supported diffusers DiT pipeline; `ditf.massive.scan.scan` and
`ditf.massive.generate.generate` are the high-level entry points behind `ditf massive ...` (their modules
keep their names: `import ditf.massive.scan`). Detected channels of edits come from a clean reference pass
(`record_reference`); transport sources keep only their channels (`TransportSource`). Names are imported on first use (PEP 562), so importing
the package loads neither torch nor matplotlib.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CfgLayout": "ditf.arch",
    "Action": "ditf.massive.actions",
    "CallState": "ditf.massive.actions",
    "ScopedAction": "ditf.massive.actions",
    "AllChannels": "ditf.massive.channels",
    "ChannelSelector": "ditf.massive.channels",
    "ControlChannels": "ditf.massive.channels",
    "DetectedChannels": "ditf.massive.channels",
    "ExplicitChannels": "ditf.massive.channels",
    "parse_channels": "ditf.massive.channels",
    "ClusterMasks": "ditf.massive.clustering",
    "cluster_massive_tokens": "ditf.massive.clustering",
    "kmeans": "ditf.massive.clustering",
    "mask_iou": "ditf.massive.clustering",
    "minmax_per_channel": "ditf.massive.clustering",
    "AdalnAlignment": "ditf.massive.detect",
    "RatioRule": "ditf.massive.detect",
    "Stability": "ditf.massive.detect",
    "SunRule": "ditf.massive.detect",
    "TopKRule": "ditf.massive.detect",
    "adaln_alignment": "ditf.massive.detect",
    "bottom_k_channels": "ditf.massive.detect",
    "detect_ratio": "ditf.massive.detect",
    "detect_sun": "ditf.massive.detect",
    "detect_table": "ditf.massive.detect",
    "detect_top_k": "ditf.massive.detect",
    "jaccard": "ditf.massive.detect",
    "jaccard_across_blocks": "ditf.massive.detect",
    "jaccard_across_runs": "ditf.massive.detect",
    "jaccard_across_steps": "ditf.massive.detect",
    "jaccard_matrix": "ditf.massive.detect",
    "magnitude_matched_channels": "ditf.massive.detect",
    "mean_pairwise_jaccard": "ditf.massive.detect",
    "random_k_channels": "ditf.massive.detect",
    "sun_massive_entries": "ditf.massive.detect",
    "top_k_channels": "ditf.massive.detect",
    "Clamp": "ditf.massive.edits",
    "ClampOp": "ditf.massive.edits",
    "ConstantOp": "ditf.massive.edits",
    "Edit": "ditf.massive.edits",
    "MeanOp": "ditf.massive.edits",
    "Op": "ditf.massive.edits",
    "Scale": "ditf.massive.edits",
    "ScaleOp": "ditf.massive.edits",
    "SetConstant": "ditf.massive.edits",
    "SetMean": "ditf.massive.edits",
    "Zero": "ditf.massive.edits",
    "ZeroOp": "ditf.massive.edits",
    "Where": "ditf.massive.edits",
    "parse_op": "ditf.massive.edits",
    "GenerationResult": "ditf.massive.generate",
    "TransportPlan": "ditf.massive.generate",
    "save_generation": "ditf.massive.generate",
    "DetailGuidance": "ditf.massive.guidance",
    "plot_activation_surface": "ditf.massive.plots",
    "plot_channel_maps": "ditf.massive.plots",
    "plot_cluster_masks": "ditf.massive.plots",
    "plot_depth_profile": "ditf.massive.plots",
    "plot_gate_alignment": "ditf.massive.plots",
    "plot_jaccard_matrix": "ditf.massive.plots",
    "plot_step_profile": "ditf.massive.plots",
    "LargeRecordingWarning": "ditf.massive.record",
    "POINTS": "ditf.massive.record",
    "Record": "ditf.massive.record",
    "Recording": "ditf.massive.record",
    "ScanReport": "ditf.massive.report",
    "build_scan_report": "ditf.massive.report",
    "load_stats_table": "ditf.massive.stats_files",
    "render_markdown": "ditf.massive.report",
    "save_stats_table": "ditf.massive.stats_files",
    "write_scan_figures": "ditf.massive.report",
    "write_scan_report": "ditf.massive.report",
    "record_reference": "ditf.massive.reference",
    "DEFAULT_RULES": "ditf.massive.scan",
    "ScanResult": "ditf.massive.scan",
    "BRANCHES": "ditf.massive.scopes",
    "Steps": "ditf.massive.scopes",
    "SourceRecord": "ditf.massive.sources",
    "TransportSource": "ditf.massive.sources",
    "Session": "ditf.massive.session",
    "intervene": "ditf.massive.session",
    "STATISTICS": "ditf.massive.stats",
    "ChannelStats": "ditf.massive.stats",
    "StatsTable": "ditf.massive.stats",
    "channel_stats": "ditf.massive.stats",
    "depth_profile": "ditf.massive.stats",
    "merge_channel_stats": "ditf.massive.stats",
    "merge_stats_tables": "ditf.massive.stats",
    "step_profile": "ditf.massive.stats",
    "TensorStore": "ditf.massive.tensorstore",
    "Transport": "ditf.massive.transport",
    "TransportResult": "ditf.massive.transport",
    "pipeline_schedule": "ditf.massive.transport",
    "prompt_interpolation": "ditf.massive.transport",
    "record_image_trajectory": "ditf.massive.transport",
    "record_trajectory": "ditf.massive.transport",
    "subject_driven": "ditf.massive.transport",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(__all__)
