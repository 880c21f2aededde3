"""`scan`: record a DiT's residual stream and write the massive-activation report, figures and statistics.

Two modes:
- generation trajectory (`prompt`, no `image`): run the pipeline and record every chosen block and
  step of the chosen CFG branch;
- single noised image (`image` and `t`): the featurizer's own path with `FeatureSettings` (posterior-mode VAE
  latents, one seeded noise draw at t by the family's convention), then one whole forward at that timestep
  (step 0); the settings are recorded in the report.

Reduced statistics are kept for every block and step; whole tensors only at a few `plot_blocks` at the
last recorded step (for the surface, channel maps and K-means masks). Output folder:
`massive_report.json` / `.md` (what reproduces the run, detected channels per block and step, stability, AdaLN
alignment, links to the image and every figure), `stats.json` + `stats.safetensors` (the StatsTable: index and
vectors; `load_stats_table` reads it, e.g. for `MeanOp`), `image.png` (what was generated or scanned), `figures/`
(PNG + PDF).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ditf.arch import arch_for
from ditf.errors import InvalidArgumentError
from ditf.massive import plots
from ditf.massive.clustering import cluster_massive_tokens
from ditf.massive.detect import DetectionRule, RatioRule, SunRule, detect_table, top_k_channels
from ditf.massive.generate import save_image_atomic
from ditf.massive.preflight import check_plan, outline_pipeline
from ditf.massive.record import Record, Recording
from ditf.massive.report import ScanReport, build_scan_report, write_scan_figures, write_scan_report
from ditf.massive.sampling import check_image_size, check_pipeline_kwargs, pipeline_settings, progress_bars, provenance, seeded
from ditf.massive.scopes import BRANCHES, BlockSpec, StepSpec, resolve_blocks
from ditf.massive.session import intervene
from ditf.massive.stats import Cell
from ditf.massive.stats_files import save_stats_table
from ditf.registry import Preset

DEFAULT_RULES: tuple[DetectionRule, ...] = (RatioRule(), SunRule())
"""Detection rules of a scan unless told otherwise: DiTF-style median ratio >= 100, and Sun et al.'s
|x| > 100 and >= 1000x the median. The first rule drives the maps, masks and AdaLN alignment."""

FALLBACK_CHANNELS = 4
"""Channels shown in maps and clustered when the first rule detects none: the top ones by median ratio."""


@dataclass
class ScanResult:
    """A scan's recording (statistics + AdaLN vectors + whole tensors at the plot blocks), its report and files."""

    recording: Recording
    plot_tensors: Recording
    report: ScanReport
    files: dict[str, Any] = field(default_factory=dict)


def default_plot_blocks(blocks: Sequence[int], count: int = 4) -> list[int]:
    """Up to `count` blocks spread evenly over `blocks` (first and last included)."""
    if len(blocks) <= count:
        return list(blocks)
    return sorted({blocks[round(i * (len(blocks) - 1) / (count - 1))] for i in range(count)})


def scan(pipe: Any, *, prompt: str = "", image: Any = None, t: float | None = None, num_inference_steps: int | None = None,
         blocks: BlockSpec = "all", steps: StepSpec = "all", branch: str = "cond", seed: int = 0,
         height: int | None = None, width: int | None = None, resolution: int | None = None,
         guidance: float | None = None, guidance_scale: float | None = None,
         rules: Sequence[DetectionRule] = DEFAULT_RULES, plot_blocks: BlockSpec | None = None,
         out_dir: str | os.PathLike[str] | None = None, preset: Preset | None = None, model: str | None = None,
         signed_clusters: bool = False, progress: bool = True, **pipe_kwargs: Any) -> ScanResult:
    """Scan `pipe`'s DiT for massive activations; write the report to `out_dir` when given.

    Generation mode uses prompt, num_inference_steps, height, width, guidance_scale (the pipeline's
    argument; pipeline defaults when None) and `pipe_kwargs` (further pipeline arguments, recorded). Image mode
    uses image, t (0..1000), resolution (long side, default: preset) and guidance (the embedded guidance of
    FLUX.1-dev / FLUX.2-dev; default: the model's), resolved into `FeatureSettings` with the model's `preset`.
    model: the model reference recorded in the report (default: the pipeline's `_name_or_path`). blocks / steps /
    branch choose what is recorded (an 'uncond' scan of a run without an unconditional branch is refused before
    sampling); plot_blocks where whole tensors are kept. signed_clusters: K-means masks on signed values instead
    of magnitudes (see `cluster_massive_tokens`).
    """
    if branch not in BRANCHES:
        raise InvalidArgumentError(f"branch={branch!r}; a scan records one branch: {', '.join(BRANCHES)}.")
    if image is None and t is not None:
        raise InvalidArgumentError("t applies to single-image scans (--image); a generation scan follows the sampler's schedule.")
    if image is not None and t is None:
        raise InvalidArgumentError("an image scan needs t, the timestep in 0..1000 to noise the image to (DiTF uses 261).")
    if image is not None and branch != "cond":
        raise InvalidArgumentError(f"branch={branch!r}: an image scan runs one conditional forward; record branch='cond'.")
    if image is not None and steps != "all":
        raise InvalidArgumentError("an image scan runs one forward (step 0); leave steps='all'.")
    arch = arch_for(pipe.transformer, getattr(pipe, "vae", None))
    chosen = resolve_blocks(blocks, arch)
    shown = default_plot_blocks(chosen) if plot_blocks is None else resolve_blocks(plot_blocks, arch)
    outside = sorted(set(shown) - set(chosen))
    if outside:
        raise InvalidArgumentError(f"plot_blocks {outside} are not among the recorded blocks; record them too (blocks=...).")
    statistics = Record(points=("image", "shift", "scale", "gate"), blocks=chosen, steps=steps, branch=branch)
    tensors = Record(points=("image",), blocks=shown, steps=steps, branch=branch, full=True, stats=False, latest_only=True)
    if image is None:
        check_pipeline_kwargs(pipe_kwargs, "scan()")
        settings = pipeline_settings(num_inference_steps, height, width, guidance_scale)
        check_image_size(settings, arch.stride)
        check_plan(outline_pipeline(pipe), given={**settings, **pipe_kwargs}, steps=steps, branch=branch)
        picture, meta = _run_generation(pipe, [statistics, tensors], prompt=prompt, seed=seed, progress=progress,
                                        settings=settings, pipe_kwargs=pipe_kwargs)
        grid = (picture.height // arch.stride, picture.width // arch.stride)
    else:
        if guidance_scale is not None or pipe_kwargs:
            raise InvalidArgumentError("guidance_scale and pipeline arguments apply to generation scans; an image scan "
                                       f"runs one forward (got {sorted(pipe_kwargs) or 'guidance_scale'}) and takes "
                                       "the embedded guidance as guidance=.")
        picture, grid, meta = _run_image(pipe, [statistics, tensors], image=image, t=t, prompt=prompt, seed=seed,
                                         resolution=resolution, guidance=guidance, preset=preset, model=model)
    meta = {**provenance(pipe, model), **meta, "branch": branch, "family": arch.family,
            "clusters": "K-means (K=2) on min-max normalised " + ("signed values" if signed_clusters else "magnitudes |x|")}
    return analyse(statistics.recording, tensors.recording, grid, rules, meta=meta, branch=branch, image=picture,
                   out_dir=out_dir, progress=progress, signed_clusters=signed_clusters)


def _run_generation(pipe: Any, records: list[Record], *, prompt: str, seed: int, progress: bool,
                    settings: dict[str, Any], pipe_kwargs: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    with progress_bars(pipe, progress), intervene(pipe, records) as session:
        output = pipe(prompt=prompt, **seeded({**settings, **pipe_kwargs, "output_type": "pil"}, seed))
    picture = output.images[0]
    options = {key: value if isinstance(value, (str, int, float, bool, type(None), list)) else repr(value)
               for key, value in pipe_kwargs.items()}
    meta = {"mode": "generation", "prompt": prompt, "seed": seed, **settings, "pipeline_options": options,
            "guidance": session.runs[-1] if session.runs else None, "image_size": [picture.height, picture.width]}
    return picture, meta


def _run_image(pipe: Any, records: list[Record], *, image: Any, t: float, prompt: str, seed: int,
               resolution: int | None, guidance: float | None, preset: Preset | None,
               model: str | None) -> tuple[Image.Image, tuple[int, int], dict[str, Any]]:
    from ditf.features.featurizer import DiTFeaturizer

    if getattr(pipe, "vae", None) is None:
        raise InvalidArgumentError("an image scan needs the model's VAE: load a full diffusers pipeline folder or hub id.")
    featurizer = DiTFeaturizer(pipe.transformer, pipe.vae, pipeline=pipe, preset=preset, model=model)
    block = preset.block if preset is not None else featurizer.arch.num_blocks() - 1  # recorded, not tapped
    settings = featurizer.settings(t=t, resolution=resolution, prompt=prompt, seed=seed, guidance=guidance,
                                   vae_sample="mode", ensemble=1, block=block)
    latents = featurizer.noisy_latents(image, settings)
    noisy = featurizer.add_noise(latents.clean, latents.noise, settings.t)
    cond = featurizer.conditioning(settings.prompt)
    with intervene(pipe.transformer, records) as session, session.at_step(0, t=settings.t, total_steps=1):
        featurizer.forward(noisy, settings.t, cond, settings.guidance)
    prepared = latents.prepared
    pixels = ((prepared.pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    record = {k: v for k, v in settings.to_dict().items() if k not in ("block", "ensemble", "normalize", "modulate",
                                                                      "discard", "massive_ratio")}
    meta = {"mode": "image", "image": prepared.name, **record, "image_size": list(prepared.resized_size),
            "guidance": {"embedded": settings.guidance, "cfg_scale": None, "unconditional_branch": False}}
    return Image.fromarray(pixels), featurizer.arch.token_grid(tuple(latents.clean.shape[-2:])), meta


def _adaln(recording: Recording, cells: Sequence[Cell], branch: str) -> dict[Cell, tuple[torch.Tensor, torch.Tensor]]:
    """(block, step) -> (gate (C,), scale (C,)) of batch row 0; per-token modulation is averaged over tokens."""
    vectors = {}
    for block, step in cells:
        _, scale, gate = recording.adaln(block, step, branch)
        vectors[(block, step)] = tuple(v.float().mean(0) if v.ndim == 2 else v.float() for v in (gate, scale))
    return vectors


def analyse(recording: Recording, plot_tensors: Recording, grid: tuple[int, int], rules: Sequence[DetectionRule], *,
            meta: dict[str, Any], branch: str = "cond", image: Image.Image | None = None,
            out_dir: str | os.PathLike[str] | None = None, progress: bool = True,
            signed_clusters: bool = False) -> ScanResult:
    """Build the report of recorded statistics (and, with `out_dir`, write it with figures and statistics)."""
    table = recording.table("image", branch)
    table.meta.update(meta)
    if not rules:
        raise InvalidArgumentError("rules is empty; pass at least one detection rule, e.g. RatioRule().")
    adaln = _adaln(recording, [cell for cell, _ in table.items()], branch)
    files: dict[str, Any] = {}
    figures: list[Path] = []
    if out_dir is not None:
        folder = Path(out_dir)
        figures = _write_figures(table, plot_tensors, grid, rules[0], adaln, branch, folder / "figures", image, progress,
                                 signed_clusters)
        if image is not None:
            files["image"] = save_image_atomic(image, folder / "image.png")
        files["stats"] = save_stats_table(table, folder / "stats.json")
    relative = [path.relative_to(Path(out_dir)) for path in figures] if out_dir is not None else []
    picture = "image.png" if out_dir is not None and image is not None else None
    report = build_scan_report(table, list(rules), adaln=adaln, figures=relative, meta=meta, image=picture)
    if out_dir is not None:
        files.update(write_scan_report(report, out_dir))
        files["figures"] = figures
    return ScanResult(recording, plot_tensors, report, files)


def _write_figures(table: Any, plot_tensors: Recording, grid: tuple[int, int], rule: DetectionRule,
                   adaln: dict[Cell, tuple[torch.Tensor, torch.Tensor]], branch: str, folder: Path,
                   image: Image.Image | None, progress: bool, signed_clusters: bool) -> list[Path]:
    detections = detect_table(table, rule)
    written = write_scan_figures(table, detections, folder, blocks=plot_tensors.blocks, progress=progress)
    step = max(plot_tensors.steps)
    clusters, titles = [], []
    for block in tqdm(plot_tensors.blocks, desc="block figures", disable=not progress):
        x = plot_tensors.tensor("image", block, step, branch)[0].float()
        if x.shape[0] != grid[0] * grid[1]:
            raise InvalidArgumentError(
                f"block {block} has {x.shape[0]} image tokens but the token grid is {grid[0]}x{grid[1]}; this model "
                "adds tokens beyond the image (e.g. reference-image tokens), so maps cannot be drawn."
            )
        stats = table[(block, step)]
        channels = detections.get((block, step)) or top_k_channels(stats.ratio_to_median, FALLBACK_CHANNELS)
        label = "detected" if detections.get((block, step)) else f"top {FALLBACK_CHANNELS} by median ratio (none detected)"
        where = f"block {block}, step {step}"
        written += plots.plot_activation_surface(x, folder / f"surface_block{block}_step{step}", title=f"|activation| at {where}")
        written += plots.plot_channel_maps(x, channels, grid, folder / f"channel_maps_block{block}_step{step}",
                                           title=f"Channel maps at {where} ({label})")
        gate, scale = adaln[(block, step)]
        written += plots.plot_gate_alignment(stats.mean_abs, gate, folder / f"gate_alignment_block{block}_step{step}",
                                             ma_channels=detections.get((block, step), []), scale=scale,
                                             title=f"|z| vs AdaLN gate and scale at {where}")
        if x.shape[0] >= 2:
            clusters.append(cluster_massive_tokens(x, channels, grid, signed=signed_clusters))
            titles.append(f"block {block}")
    if clusters:
        picture = None if image is None else image.convert("RGB")
        written += plots.plot_cluster_masks(clusters, folder / f"cluster_masks_step{step}", titles=titles,
                                            image=None if picture is None else np.asarray(picture),
                                            title=f"K-means (K=2) on massive channels ("
                                                  f"{'signed values' if signed_clusters else 'magnitudes'}), step {step}")
    return written


__all__ = ["DEFAULT_RULES", "ScanResult", "analyse", "default_plot_blocks", "scan"]
