"""Seeded pipeline calls shared by scans, generation, reference passes and transport sources.

Every trajectory of one experiment (the clean reference pass, a transport source, the edited run) starts from the
same noise: a fresh CPU generator seeded with the run's seed. Settings are checked before any model runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.versions import library_versions


def seeded(pipe_kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """`pipe_kwargs` with a fresh CPU generator seeded with `seed` (the same noise for every trajectory)."""
    if "generator" in pipe_kwargs or "latents" in pipe_kwargs:
        raise InvalidArgumentError("pass `seed` instead of generator= / latents=: every trajectory must start from the "
                                   "same noise.")
    return {**pipe_kwargs, "generator": torch.Generator().manual_seed(int(seed))}


@contextmanager
def progress_bars(pipe: Any, enabled: bool) -> Iterator[None]:
    """Show (or hide) the pipeline's per-step progress bar inside the block, then restore its setting."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**previous, "disable": not enabled})
    try:
        yield
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = previous


def pipeline_settings(num_inference_steps: int | None, height: int | None, width: int | None,
                      guidance_scale: float | None) -> dict[str, Any]:
    """The pipeline keyword arguments that were given (None means: the pipeline's own default), checked: at
    least one step, and image sides that are positive multiples of 8 pixels (the model's own stride, 16 or 32,
    is checked once the model is known)."""
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or num_inference_steps < 1):
        raise InvalidArgumentError(f"num_inference_steps={num_inference_steps} must be at least 1.")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (isinstance(side, bool) or side < 8 or side % 8):
            raise InvalidArgumentError(f"{name}={side} must be a positive multiple of 8 pixels (e.g. 512 or 1024).")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise InvalidArgumentError(f"guidance_scale={guidance_scale} must be a number >= 0.")
    settings = {"num_inference_steps": num_inference_steps, "height": height, "width": width,
                "guidance_scale": guidance_scale}
    return {key: value for key, value in settings.items() if value is not None}


def check_image_size(settings: dict[str, Any], stride: int) -> None:
    """Refuse a height or width (in `settings`) that is not a multiple of the model's `stride` (pixels per token)."""
    for name in ("height", "width"):
        if name in settings and settings[name] % stride:
            raise InvalidArgumentError(f"{name}={settings[name]} must be a multiple of {stride} pixels for this model "
                                       f"(e.g. {settings[name] // stride * stride or stride}).")


def check_pipeline_kwargs(pipe_kwargs: dict[str, Any], owner: str) -> None:
    """Refuse pipeline arguments that `owner` sets itself (the output type and the noise)."""
    for name in ("output_type", "generator", "latents"):
        if name in pipe_kwargs:
            raise InvalidArgumentError(f"{owner} sets {name} itself (the seed fixes the noise; images come back as "
                                       f"PIL); do not pass {name}.")


def provenance(pipe: Any, model: str | None = None) -> dict[str, Any]:
    """What reproduces a run on `pipe`: the model reference (`model`, else the hub id or path the pipeline was
    loaded from), the pipeline and transformer classes, the transformer's dtype and device, and library versions."""
    transformer = pipe.transformer
    reference = model or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    device = getattr(pipe, "_execution_device", None) or getattr(transformer, "device", None)
    return {"model": None if reference is None else str(reference), "pipeline": type(pipe).__name__,
            "transformer": type(transformer).__name__,
            "dtype": str(getattr(transformer, "dtype", "unknown")).replace("torch.", ""),
            "device": str(device), "versions": library_versions()}


__all__ = ["check_image_size", "check_pipeline_kwargs", "pipeline_settings", "progress_bars", "provenance", "seeded"]
