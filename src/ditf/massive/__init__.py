"""Massive activations in DiTs: record, measure, plot, and intervene during generation.

Analysis (pure tensors): `channel_stats`, `StatsTable`, detection rules (`RatioRule`, `SunRule`,
`TopKRule`), channel sets and Jaccard stability, `adaln_alignment`, `cluster_massive_tokens`, plots
and scan reports. Model side: `intervene(pipe, [Record(...), Zero(...), Transport(...),
DetailGuidance(...)])` hooks any supported diffusers DiT pipeline; `scan` and `generate` are the
high-level entry points behind `ditf massive scan` and `ditf generate`.
"""

from ditf.arch import CfgLayout
from ditf.massive.actions import Action, CallState, ScopedAction
from ditf.massive.channels import (
    AllChannels,
    ChannelSelector,
    ControlChannels,
    DetectedChannels,
    ExplicitChannels,
    parse_channels,
)
from ditf.massive.clustering import ClusterMasks, cluster_massive_tokens, kmeans, mask_iou, minmax_per_channel
from ditf.massive.detect import (
    AdalnAlignment,
    RatioRule,
    Stability,
    SunRule,
    TopKRule,
    adaln_alignment,
    bottom_k_channels,
    detect_ratio,
    detect_sun,
    detect_table,
    detect_top_k,
    jaccard,
    jaccard_across_blocks,
    jaccard_across_runs,
    jaccard_across_steps,
    jaccard_matrix,
    magnitude_matched_channels,
    mean_pairwise_jaccard,
    random_k_channels,
    sun_massive_entries,
    top_k_channels,
)
from ditf.massive.edits import (
    Clamp,
    ClampOp,
    ConstantOp,
    Edit,
    MeanOp,
    Op,
    Scale,
    ScaleOp,
    SetConstant,
    SetMean,
    Zero,
    ZeroOp,
    parse_op,
)
from ditf.massive.generate import GenerationResult, TransportPlan, generate, save_generation
from ditf.massive.guidance import DetailGuidance
from ditf.massive.plots import (
    plot_activation_surface,
    plot_channel_maps,
    plot_cluster_masks,
    plot_depth_profile,
    plot_gate_alignment,
    plot_jaccard_matrix,
    plot_step_profile,
)
from ditf.massive.record import POINTS, Record, Recording
from ditf.massive.report import (
    ScanReport,
    build_scan_report,
    load_stats_table,
    render_markdown,
    save_stats_table,
    write_scan_figures,
    write_scan_report,
)
from ditf.massive.scan import DEFAULT_RULES, ScanResult, scan
from ditf.massive.scopes import BRANCHES, Steps
from ditf.massive.session import Session, intervene
from ditf.massive.stats import (
    STATISTICS,
    ChannelStats,
    StatsTable,
    channel_stats,
    depth_profile,
    merge_channel_stats,
    merge_stats_tables,
    step_profile,
)
from ditf.massive.transport import (
    Transport,
    TransportResult,
    pipeline_schedule,
    prompt_interpolation,
    record_image_trajectory,
    record_trajectory,
    subject_driven,
)

__all__ = [
    # statistics, detection, clustering
    "STATISTICS", "ChannelStats", "StatsTable", "channel_stats", "depth_profile", "merge_channel_stats",
    "merge_stats_tables", "step_profile", "AdalnAlignment", "RatioRule", "Stability", "SunRule", "TopKRule",
    "adaln_alignment", "bottom_k_channels", "detect_ratio", "detect_sun", "detect_table", "detect_top_k", "jaccard",
    "jaccard_across_blocks", "jaccard_across_runs", "jaccard_across_steps", "jaccard_matrix",
    "magnitude_matched_channels", "mean_pairwise_jaccard", "random_k_channels", "sun_massive_entries",
    "top_k_channels", "ClusterMasks", "cluster_massive_tokens", "kmeans", "mask_iou", "minmax_per_channel",
    # plots and reports
    "plot_activation_surface", "plot_channel_maps", "plot_cluster_masks", "plot_depth_profile", "plot_gate_alignment",
    "plot_jaccard_matrix", "plot_step_profile", "ScanReport", "build_scan_report", "load_stats_table",
    "render_markdown", "save_stats_table", "write_scan_figures", "write_scan_report",
    # hooks and interventions
    "Action", "AllChannels", "BRANCHES", "CallState", "CfgLayout", "ChannelSelector", "Clamp", "ClampOp",
    "ConstantOp", "ControlChannels", "DetectedChannels", "Edit", "ExplicitChannels", "MeanOp", "Op", "Scale",
    "ScaleOp", "ScopedAction", "Session", "SetConstant", "SetMean", "Steps", "Zero", "ZeroOp", "intervene",
    "parse_channels", "parse_op",
    "POINTS", "Record", "Recording", "DetailGuidance", "Transport", "TransportResult", "pipeline_schedule",
    "prompt_interpolation", "record_image_trajectory", "record_trajectory", "subject_driven",
    # high level
    "DEFAULT_RULES", "ScanResult", "scan", "GenerationResult", "TransportPlan", "generate", "save_generation",
]
