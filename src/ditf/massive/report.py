"""Scan reports (JSON + Markdown) and atomic file writing for massive-activation analyses.

A scan report gathers, for one `StatsTable`: the channels each detection rule finds per block and
step, the strongest channels with their statistics (signed mean included), the Jaccard stability of the
detected sets across steps, blocks and runs (prompts or seeds; undefined, i.e. missing, where both sets are
empty), and the AdaLN alignment of the MA channels. Its `meta` carries what reproduces the run (model reference,
dtype, device, library versions, the guidance really used, the pipeline options), and it links every figure and
the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ditf.errors import InvalidArgumentError
from ditf.io import write_json_atomic, write_text_atomic
from ditf.massive import plots
from ditf.massive.detect import (
    AdalnAlignment,
    DetectionRule,
    Detections,
    adaln_alignment,
    detect_table,
    jaccard_across_blocks,
    jaccard_across_runs,
    jaccard_across_steps,
    mean_pairwise_jaccard,
    off_diagonal_values,
)
from ditf.massive.stats import Cell, StatsTable, depth_profile, step_profile
from ditf.massive.stats_files import load_stats_table, save_stats_table

REPORT_FORMAT = "ditf.massive.ScanReport"
_MAX_LISTED_CHANNELS = 12
_MAX_GRID_STEPS = 8
_MAX_ALIGNMENT_ROWS = 60

# ---------------------------------------------------------------------------------------------
# Building a report


def rule_label(rule: DetectionRule) -> str:
    """A readable, unique-per-parameters label such as "ratio(threshold=100.0)"."""
    parameters = {key: value for key, value in rule.describe().items() if key != "rule"}
    return f"{rule.name}({', '.join(f'{key}={value}' for key, value in parameters.items())})"


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class ScanReport:
    """Everything a scan found; `to_dict` gives the JSON form and `render_markdown` the summary."""

    meta: dict[str, Any]
    num_channels: int
    blocks: list[int]
    steps: list[int]
    timesteps: dict[int, float]
    rules: dict[str, dict[str, Any]]
    detections: dict[str, Detections]
    top_channels: dict[Cell, list[dict[str, Any]]]
    stability: dict[str, dict[str, Any]]
    alignment_rule: str | None = None
    alignment: dict[Cell, AdalnAlignment | None] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    image: str | None = None
    """The generated or scanned image, relative to the report."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (strict JSON: non-finite numbers are written as null)."""
        return {
            "format": REPORT_FORMAT,
            "version": 1,
            "meta": self.meta,
            "num_channels": self.num_channels,
            "blocks": self.blocks,
            "steps": self.steps,
            "timesteps": {str(step): t for step, t in sorted(self.timesteps.items())},
            "rules": self.rules,
            "detections": {
                label: [{"block": b, "step": s, "channels": channels} for (b, s), channels in sorted(cells.items())]
                for label, cells in self.detections.items()
            },
            "top_channels": [
                {"block": b, "step": s, "channels": rows} for (b, s), rows in sorted(self.top_channels.items())
            ],
            "stability": self.stability,
            "alignment": {
                "rule": self.alignment_rule,
                "cells": [
                    {"block": b, "step": s, **(result.to_dict() if result is not None else {"ma_channels": []})}
                    for (b, s), result in sorted(self.alignment.items())
                ],
            },
            "image": self.image,
            "figures": self.figures,
        }


def _top_channel_rows(table: StatsTable, top_n: int) -> dict[Cell, list[dict[str, Any]]]:
    rows: dict[Cell, list[dict[str, Any]]] = {}
    for cell, stats in table.items():
        ratio = stats.ratio_to_median
        order = ratio.argsort(descending=True, stable=True)[: min(top_n, stats.num_channels)]
        rows[cell] = [
            {
                "channel": int(channel),
                "ratio_to_median": _finite(ratio[channel]),
                "median_abs": _finite(stats.median_abs[channel]),
                "mean": _finite(stats.mean[channel]),
                "mean_abs": _finite(stats.mean_abs[channel]),
                "abs_mean": _finite(stats.abs_mean[channel]),
                "max_abs": _finite(stats.max_abs[channel]),
            }
            for channel in order.tolist()
        ]
    return rows


def _summarise(matrix: torch.Tensor) -> dict[str, float | None]:
    """Mean and min of the defined pairwise Jaccard indices (None when no pair has a defined index)."""
    defined = off_diagonal_values(matrix)
    return {
        "mean_jaccard": mean_pairwise_jaccard(matrix),
        "min_jaccard": float(defined.min()) if defined.numel() else None,
        "pairs": int(matrix.shape[0] * (matrix.shape[0] - 1) // 2),
        "undefined_pairs": int((matrix.shape[0] * (matrix.shape[0] - 1) - defined.numel()) // 2),
    }


def _stability(detections: Detections, run_detections: Mapping[str, Detections] | None) -> dict[str, Any]:
    blocks = sorted({b for b, _ in detections})
    steps = sorted({s for _, s in detections})
    result: dict[str, Any] = {
        "cells_with_channels": sum(1 for channels in detections.values() if channels),
        "across_steps": [{"block": b, **_summarise(jaccard_across_steps(detections, b).matrix)} for b in blocks],
        "across_blocks": [{"step": s, **_summarise(jaccard_across_blocks(detections, s).matrix)} for s in steps],
    }
    if run_detections:
        common = sorted(set.intersection(*(set(cells) for cells in run_detections.values())))
        result["runs"] = list(run_detections)
        result["across_runs"] = [
            {"block": b, "step": s, **_summarise(jaccard_across_runs(run_detections, b, s).matrix)} for b, s in common
        ]
    return result


def build_scan_report(
    table: StatsTable,
    rules: Sequence[DetectionRule],
    *,
    adaln: Mapping[Cell, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    runs: Mapping[str, StatsTable] | None = None,
    top_n: int = 5,
    figures: Sequence[str | os.PathLike[str]] = (),
    meta: Mapping[str, Any] | None = None,
    image: str | os.PathLike[str] | None = None,
) -> ScanReport:
    """Detect, rank, compare and align everything in `table` into a `ScanReport`.

    rules: detection rules (e.g. `RatioRule()`, `SunRule()`, `TopKRule(k=12)`); the first one's
    channels are used for AdaLN alignment. adaln: optional (block, step) -> (gate (C,), scale (C,) or
    None) for the cells to align. runs: optional per-prompt or per-seed tables (label -> table) for
    the across-runs Jaccard. meta: provenance merged over `table.meta`. figures, image: paths relative to the
    report, linked from it.
    """
    if not rules:
        raise InvalidArgumentError("rules is empty; pass at least one rule, e.g. [RatioRule(), SunRule()].")
    if len(table) == 0:
        raise InvalidArgumentError("the statistics table is empty; record at least one block and step first.")
    labels = [rule_label(rule) for rule in rules]
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"rules {labels} repeat; pass each rule (with its parameters) once.")
    detections = {label: detect_table(table, rule) for label, rule in zip(labels, rules)}
    stability = {
        label: _stability(
            detections[label], {name: detect_table(run, rule) for name, run in runs.items()} if runs else None
        )
        for label, rule in zip(labels, rules)
    }
    alignment: dict[Cell, AdalnAlignment | None] = {}
    for cell, (gate, scale) in sorted((adaln or {}).items()):
        if cell not in detections[labels[0]]:
            raise InvalidArgumentError(
                f"AdaLN vectors given for block {cell[0]}, step {cell[1]}, which the table does not hold; "
                f"recorded blocks {table.blocks}, steps {table.steps}."
            )
        channels = detections[labels[0]][cell]
        alignment[cell] = adaln_alignment(channels, gate, scale) if channels else None
    return ScanReport(
        meta={**table.meta, **dict(meta or {})},
        num_channels=table.num_channels,
        blocks=table.blocks,
        steps=table.steps,
        timesteps=dict(table.timesteps),
        rules={label: rule.describe() for label, rule in zip(labels, rules)},
        detections=detections,
        top_channels=_top_channel_rows(table, top_n),
        stability=stability,
        alignment_rule=labels[0] if adaln else None,
        alignment=alignment,
        figures=[str(path) for path in figures],
        image=None if image is None else str(image),
    )


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _channels(channels: Sequence[int]) -> str:
    if not channels:
        return "–"
    shown = ", ".join(str(c) for c in channels[:_MAX_LISTED_CHANNELS])
    hidden = len(channels) - _MAX_LISTED_CHANNELS
    return shown + (f" … (+{hidden})" if hidden > 0 else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _step_name(report: ScanReport, step: int) -> str:
    t = report.timesteps.get(step)
    return f"step {step}" + (f" (t={t:g})" if t is not None else "")


def _detection_lines(report: ScanReport, label: str) -> list[str]:
    cells = report.detections[label]
    lines = [f"### {label}", ""]
    if not any(cells.values()):
        return lines + ["No channel passes this rule at any recorded block and step.", ""]
    if len(report.steps) <= _MAX_GRID_STEPS:
        rows = [
            [b, *(_channels(cells[(b, s)]) if (b, s) in cells else "not recorded" for s in report.steps)]
            for b in report.blocks
        ]
        return lines + _table(["block", *(_step_name(report, s) for s in report.steps)], rows)
    across_steps = {row["block"]: row["mean_jaccard"] for row in report.stability[label]["across_steps"]}
    rows = []
    for block in report.blocks:
        sets = [set(cells[(block, s)]) for s in report.steps if (block, s) in cells]
        always, sometimes = sorted(set.intersection(*sets)), sorted(set.union(*sets))
        rows.append([block, _channels(always), _channels(sometimes), across_steps[block]])
    lines += _table(["block", "in every step", "in some step", "mean Jaccard across steps"], rows)
    return lines + ["Per-step lists are in the JSON report (`detections`).", ""]


def render_markdown(report: ScanReport, title: str = "Massive-activation scan") -> str:
    """The human-readable summary of a scan report."""
    lines = [f"# {title}", ""]
    if report.image:
        lines += [f"![generated image]({report.image})", ""]
    if report.meta:
        lines += ["## Run", ""]
        lines += _table(["setting", "value"], [[key, _setting(value)] for key, value in report.meta.items()])
    lines += ["## Detection rules", ""]
    lines += [f"- `{label}`: {_setting({k: v for k, v in rule.items() if k != 'rule'}) or 'no parameters'}"
              for label, rule in report.rules.items()]
    lines += [""]
    lines += [
        f"- channels per token: {report.num_channels}",
        f"- blocks: {report.blocks[0]}–{report.blocks[-1]} ({len(report.blocks)} recorded)",
        f"- steps: {', '.join(_step_name(report, s) for s in report.steps)}",
        "",
        "## Detected massive channels",
        "",
    ]
    for label in report.rules:
        lines += _detection_lines(report, label)

    last_step = report.steps[-1]
    lines += [f"## Strongest channels at {_step_name(report, last_step)}", ""]
    rows = []
    for block in report.blocks:
        for entry in report.top_channels.get((block, last_step), [])[:3]:
            statistics = [entry[key] for key in ("ratio_to_median", "mean", "mean_abs", "median_abs", "max_abs")]
            rows.append([block, entry["channel"], *statistics])
    lines += _table(["block", "channel", "median ratio", "mean (signed)", "mean abs", "median abs", "max abs"], rows)

    lines += ["## Stability of the detected sets (Jaccard)", "",
              "Pairs where both sets are empty have no Jaccard index; they are left out of the means (– when no pair "
              "is left).", ""]
    for label, stability in report.stability.items():
        lines += [f"### {label}", ""]
        if not stability["cells_with_channels"]:
            lines += ["Nothing detected, so there is no set to compare.", ""]
            continue
        lines += _table(
            ["block", "mean across steps", "min across steps"],
            [[row["block"], row["mean_jaccard"], row["min_jaccard"]] for row in stability["across_steps"]],
        )
        lines += _table(
            ["step", "mean across blocks", "min across blocks"],
            [
                [_step_name(report, row["step"]), row["mean_jaccard"], row["min_jaccard"]]
                for row in stability["across_blocks"]
            ],
        )
        if "across_runs" in stability:
            lines += [f"Across runs {', '.join(stability['runs'])} at {_step_name(report, last_step)}:", ""]
            lines += _table(
                ["block", "mean across runs", "min across runs"],
                [
                    [row["block"], row["mean_jaccard"], row["min_jaccard"]]
                    for row in stability["across_runs"]
                    if row["step"] == last_step
                ],
            )

    if report.alignment:
        lines += [f"## AdaLN alignment (MA channels from {report.alignment_rule})", ""]
        cells = sorted(report.alignment.items())
        if len(cells) > _MAX_ALIGNMENT_ROWS:
            cells = [(cell, result) for cell, result in cells if cell[1] == last_step]
            lines += [f"Rows for {_step_name(report, last_step)}; every step is in the JSON report.", ""]
        rows = []
        for (block, step), result in cells:
            if result is None:
                rows.append([block, step, "none detected", "–", None, None, "–", None, None])
                continue
            gate = [_channels(result.gate_peaks), result.gate_jaccard, result.gate_recall]
            scale = [_channels(result.scale_peaks or []), result.scale_jaccard, result.scale_recall]
            rows.append([block, step, _channels(result.ma_channels), *gate, *scale])
        lines += _table(
            ["block", "step", "MA channels", "gate peaks", "gate Jaccard", "gate recall"]
            + ["scale peaks", "scale Jaccard", "scale recall"],
            rows,
        )
        lines += ["Peaks are the top-k channels by |value| with k = the number of MA channels.", ""]

    if report.figures:
        lines += ["## Figures", ""]
        for path in report.figures:
            if str(path).endswith(".png"):
                pdf = str(Path(path).with_suffix(".pdf"))
                also = f" ([PDF]({pdf}))" if pdf in report.figures else ""
                lines += [f"![{Path(path).stem}]({path}){also}", ""]
    return "\n".join(lines)


def _setting(value: Any) -> str:
    """A setting for the Markdown table: dicts as `key: value; ...`, lists comma-separated."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_setting(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(item) for item in value)
    return _fmt(value) if isinstance(value, float) or value is None else str(value)


def write_scan_report(
    report: ScanReport, out_dir: str | os.PathLike[str], name: str = "massive_report"
) -> dict[str, Path]:
    """Write `<out_dir>/<name>.json` and `<name>.md` atomically; return {"json": path, "markdown": path}."""
    folder = Path(out_dir)
    return {
        "json": write_json_atomic(folder / f"{name}.json", report.to_dict()),
        "markdown": write_text_atomic(folder / f"{name}.md", render_markdown(report)),
    }


# ---------------------------------------------------------------------------------------------
# Standard figures of a scan (reduced statistics only)


def _block_figures(table: StatsTable, detections: Detections, block: int, folder: Path) -> list[Path]:
    channels = sorted({c for s in table.steps for c in detections.get((block, s), [])})
    if not channels:
        return []
    profile = step_profile(table, block, channels)
    use_t = profile.timesteps is not None
    written = plots.plot_step_profile(
        profile.timesteps if use_t else profile.steps,
        profile.values,
        [f"ch {c}" for c in channels],
        folder / f"step_profile_block{block}",
        median=profile.median,
        x_label="timestep t" if use_t else "denoising step",
        title=f"Massive-channel magnitude across denoising (block {block})",
    )
    if len(table.steps) > 1:
        across = jaccard_across_steps(detections, block)
        written += plots.plot_jaccard_matrix(
            across.matrix,
            across.labels,
            folder / f"jaccard_steps_block{block}",
            axis_label="step",
            title=f"Stability of the MA set across steps (block {block})",
        )
    return written


def write_scan_figures(
    table: StatsTable,
    detections: Detections,
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    blocks: Sequence[int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Figures that need only reduced statistics: depth profile, step profiles and Jaccard matrices.

    step: the step for the depth profile and the across-blocks Jaccard (default: the last one);
    blocks: the blocks that get a step profile and an across-steps Jaccard (default: every block
    with detected channels, at most 4 evenly spaced). Returns the written PNG and PDF paths.
    """
    folder = Path(out_dir)
    step = table.steps[-1] if step is None else step
    if blocks is None:
        with_channels = [b for b in table.blocks if any(detections.get((b, s)) for s in table.steps)]
        blocks = with_channels[:: max(1, math.ceil(len(with_channels) / 4))]
    profile = depth_profile(table, step)
    written = plots.plot_depth_profile(
        profile.blocks,
        profile.top,
        profile.median,
        folder / f"depth_profile_step{step}",
        title=f"Largest and median |activation| across depth (step {step})",
    )
    across = jaccard_across_blocks(detections, step)
    written += plots.plot_jaccard_matrix(
        across.matrix, across.labels, folder / f"jaccard_blocks_step{step}", axis_label="block"
    )
    for block in tqdm(blocks, desc="scan figures per block", disable=not progress):
        written += _block_figures(table, detections, block, folder)
    return written


__all__ = [
    "ScanReport",
    "build_scan_report",
    "load_stats_table",
    "render_markdown",
    "rule_label",
    "save_stats_table",
    "write_scan_figures",
    "write_scan_report",
    "write_text_atomic",
]
