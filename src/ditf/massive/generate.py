"""Generate an image with a stock diffusers pipeline while interventions run, and record what they did.

`generate` is the library side of `ditf generate`: it seeds the pipeline, optionally records a source
trajectory for activation transport, runs the pipeline inside `intervene`, and returns the image with
a JSON-able record of every intervention applied (per block, step and branch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ditf.arch import arch_for
from ditf.errors import InvalidArgumentError
from ditf.io import atomic_path, write_json_atomic
from ditf.massive.actions import Action
from ditf.massive.channels import ChannelSpec
from ditf.massive.scopes import BlockSpec, StepSpec
from ditf.massive.session import intervene
from ditf.massive.transport import Spatial, Transport, record_trajectory, seeded


@dataclass(frozen=True)
class TransportPlan:
    """Transport from another prompt's trajectory (same seed and settings) into the generated one."""

    source_prompt: str
    blocks: BlockSpec
    steps: StepSpec = "all"
    channels: ChannelSpec | None = "auto"
    spatial: Spatial = None
    branch: str = "all"


@dataclass
class GenerationResult:
    """The generated image (PIL) and the record of the run: settings, interventions, timesteps."""

    image: Image.Image
    record: dict[str, Any] = field(default_factory=dict)


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


def generate(pipe: Any, prompt: str, *, actions: Sequence[Action] = (), transport: TransportPlan | None = None,
             seed: int = 0, num_inference_steps: int | None = None, height: int | None = None,
             width: int | None = None, guidance_scale: float | None = None, progress: bool = True,
             **pipe_kwargs: Any) -> GenerationResult:
    """Run `pipe(prompt, ...)` with `actions` hooked in; return the image (PIL) and what was done.

    actions: edits (`Zero`, `Scale`, ...), `DetailGuidance`, `Record`, ... (see `intervene`).
    transport: first generates `transport.source_prompt` with the same seed and settings, recording
    its image stream at the plan's blocks and steps, then transports it into this run. Other keyword
    arguments go to the pipeline unchanged (and into the record).
    """
    if "output_type" in pipe_kwargs:
        raise InvalidArgumentError("generate() returns a PIL image; do not pass output_type.")
    settings = pipeline_settings(num_inference_steps, height, width, guidance_scale)
    check_image_size(settings, arch_for(pipe.transformer, getattr(pipe, "vae", None)).stride)
    call_kwargs = {**settings, **pipe_kwargs, "output_type": "pil"}
    actions = list(actions)
    record: dict[str, Any] = {"prompt": prompt, "seed": seed, "pipeline": type(pipe).__name__,
                              "settings": {**settings, **{k: _jsonable(v) for k, v in pipe_kwargs.items()}}}
    with progress_bars(pipe, progress):
        if transport is not None:
            _, source = record_trajectory(pipe, transport.source_prompt, blocks=transport.blocks, steps=transport.steps,
                                          seed=seed, branch=transport.branch, **call_kwargs)
            actions.append(Transport(source, channels=transport.channels, spatial=transport.spatial,
                                     blocks=transport.blocks, steps=transport.steps, branch=transport.branch))
            record["transport_source"] = {"prompt": transport.source_prompt, "seed": seed}
        with intervene(pipe, actions) as session:
            output = pipe(prompt=prompt, **seeded(call_kwargs, seed))
    record["timesteps"] = {str(step): t for step, t in sorted(session.timesteps.items())}
    record["interventions"] = session.describe()
    return GenerationResult(output.images[0], record)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)


def save_image_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save a PIL image (format from the suffix) through a temporary file in the same folder + os.replace."""
    target = Path(path)
    with atomic_path(target) as temporary:
        image.save(temporary, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
    return target


def save_generation(result: GenerationResult, path: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the image to `path` and its record to the same name with `.json`; return both paths."""
    target = Path(path)
    if target.suffix.lower() not in Image.registered_extensions():
        raise InvalidArgumentError(f"output {str(target)!r} has no image suffix; use e.g. out.png.")
    image = save_image_atomic(result.image, target)
    record = write_json_atomic(target.with_suffix(".json"), {**result.record, "image": target.name})
    return {"image": image, "record": record}


__all__ = ["GenerationResult", "TransportPlan", "generate", "progress_bars", "save_generation", "save_image_atomic"]
