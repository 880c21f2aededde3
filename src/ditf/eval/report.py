"""Results files of the correspondence benchmarks: JSON, Markdown table, protocol card, plots.

Every file is written atomically (temporary file in the same folder, then `os.replace`), so an
interrupted run never leaves a half-written result.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np

from ditf.eval.keypoints import CorrespondenceDataset
from ditf.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from ditf.eval.metrics import bbox_threshold, correct_mask, point_errors


def format_protocol_card(card: dict) -> str:
    """The protocol card as aligned, wrapped plain text."""
    lines = [f"protocol card: {card['name']} ({card['reference']})"]
    entries = dict(card.get("description", {}))
    entries["alphas"] = ", ".join(str(alpha) for alpha in card["alphas"])
    entries.update({f"fusion {key}": value for key, value in card.get("fusion", {}).items()})
    width = max(len(key) for key in entries)
    for key, value in entries.items():
        wrapped = textwrap.wrap(str(value), width=96) or [""]
        lines.append(f"  {key:<{width}} {wrapped[0]}")
        lines.extend(f"  {'':<{width}} {line}" for line in wrapped[1:])
    return "\n".join(lines)


def _alpha_summaries(results: dict) -> list[tuple[str, dict]]:
    return [(str(results["alpha"]), results)] + list(results.get("by_alpha", {}).items())


def markdown_table(results: dict) -> str:
    """Markdown: a title, one row per category plus pooled and category-mean rows, with per-image
    and per-point PCK (percent) at every alpha, then the protocol card."""
    summaries = _alpha_summaries(results)
    header = ["category", "pairs", "points"]
    for alpha, _ in summaries:
        header += [f"per image @{alpha}", f"per point @{alpha}"]
    rows = []
    for category, main in results["per_category"].items():
        row = [category, str(main["pairs"]), str(main["points"])]
        for _, summary in summaries:
            scores = summary["per_category"][category]
            row += [f"{scores['per_image']:.2f}", f"{scores['per_point']:.2f}"]
        rows.append(row)
    pairs = sum(main["pairs"] for main in results["per_category"].values())
    points = sum(main["points"] for main in results["per_category"].values())
    for label, prefix in (("**all (pooled)**", "all"), ("**mean (categories)**", "mean")):
        row = [label, str(pairs), str(points)]
        for _, summary in summaries:
            row += [f"{summary[f'{prefix}_per_image']:.2f}", f"{summary[f'{prefix}_per_point']:.2f}"]
        rows.append(row)
    benchmark = results.get("benchmark", {})
    title = f"# PCK on {benchmark.get('name', '?')} ({benchmark.get('split', '?')}"
    title += f", {benchmark['subset']})" if benchmark.get("subset") else ")"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "```", format_protocol_card(results["protocol"]), "```", ""]
    if results.get("settings"):
        lines += ["Settings: `" + json.dumps(results["settings"], sort_keys=True) + "`", ""]
    lines.append(f"ditf {results.get('ditf_version', '?')}")
    return "\n".join(lines) + "\n"


def _save_figure_atomic(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def plot_per_category(results: dict, path: str | Path) -> None:
    """Bar chart (PNG) of per-image and per-point PCK per category at the main alpha, with the
    pooled scores as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(results["per_category"])
    per_image = [results["per_category"][c]["per_image"] for c in categories]
    per_point = [results["per_category"][c]["per_point"] for c in categories]
    positions = np.arange(len(categories))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) + 2), 4))
    axes.bar(positions - 0.2, per_image, width=0.4, label="per image")
    axes.bar(positions + 0.2, per_point, width=0.4, label="per point")
    axes.axhline(results["all_per_image"], color="C0", linestyle="--", linewidth=1, label="all, per image")
    axes.axhline(results["all_per_point"], color="C1", linestyle="--", linewidth=1, label="all, per point")
    axes.set_xticks(positions, categories, rotation=45, ha="right")
    axes.set_ylabel(f"PCK@{results['alpha']} (%)")
    axes.set_ylim(0, 100)
    benchmark = results.get("benchmark", {})
    axes.set_title(f"{benchmark.get('name', '')} {benchmark.get('split', '')} — protocol {results['protocol']['name']}")
    axes.legend(fontsize=8)
    _save_figure_atomic(figure, Path(path))


def plot_pairs(dataset: CorrespondenceDataset, results: dict, path: str | Path, num_pairs: int = 6, seed: int = 0) -> None:
    """Figure (PNG) of `num_pairs` random pairs (seeded): source keypoints, and on the target the
    annotated points (circles) and predictions (crosses), green when correct at the main alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    chosen = np.random.default_rng(seed).choice(len(dataset.pairs), size=min(num_pairs, len(dataset.pairs)), replace=False)
    card = results["protocol"]
    figure, axes = plt.subplots(len(chosen), 2, figsize=(8, 3.2 * len(chosen)), squeeze=False)
    for row, index in enumerate(sorted(chosen)):
        pair = dataset.pairs[index]
        predicted = np.asarray(results["pairs"][pair.name]["pred_trg_kps"], dtype=np.float64)
        if card["threshold"] == "bbox" and pair.target_bbox is not None:
            threshold = bbox_threshold(pair.target_bbox)
        else:
            threshold = float(max(pair.target.size))
        correct = correct_mask(point_errors(predicted, pair.target_points), threshold, results["alpha"], card["rule"])
        colours = plt.cm.tab20(np.arange(pair.num_points) % 20)
        for column, (image, points) in enumerate(((pair.source, pair.source_points), (pair.target, pair.target_points))):
            with Image.open(image.path) as picture:
                axes[row, column].imshow(picture.convert("RGB"))
            axes[row, column].scatter(points[:, 0], points[:, 1], s=36, facecolors="none", edgecolors=colours, linewidths=1.5)
            axes[row, column].set_axis_off()
        axes[row, 1].scatter(predicted[:, 0], predicted[:, 1], s=40, marker="x",
                             c=np.where(correct, "lime", "red"), linewidths=2)
        axes[row, 0].set_title(pair.name, fontsize=7)
        axes[row, 1].set_title(f"{int(correct.sum())}/{pair.num_points} correct (o true, x predicted)", fontsize=7)
    _save_figure_atomic(figure, Path(path))


def write_results(
    results: dict,
    output: str | Path,
    dataset: CorrespondenceDataset | None = None,
    plot: bool = False,
    num_plot_pairs: int = 6,
    seed: int = 0,
) -> list[Path]:
    """Write `output` (JSON), the Markdown table next to it (`.md`) and, with `plot`, the bar chart
    (`_per_category.png`) and the pairs figure (`_pairs.png`, needs `dataset`). Returns the paths."""
    output = Path(output)
    written = []
    if plot:
        chart = output.with_name(f"{output.stem}_per_category.png")
        plot_per_category(results, chart)
        written.append(chart)
        if dataset is not None:
            figure = output.with_name(f"{output.stem}_pairs.png")
            plot_pairs(dataset, results, figure, num_plot_pairs, seed)
            written.append(figure)
    table = output.with_suffix(".md")
    write_text_atomic(table, markdown_table(results))
    write_json_atomic(output, results)
    return [output, table] + written
