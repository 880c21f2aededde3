"""Generate an image with a stock diffusers pipeline while interventions run, and record what they did.

`generate` is the library side of `ditf massive disrupt | guide | transport`: it seeds the pipeline, runs the
clean reference pass that detected channels and controls need (`ditf.massive.reference`), records a source
trajectory for activation transport, runs the pipeline inside `intervene`, and returns the image with a JSON-able
record of the run: what reproduces it (model, dtype, device, versions, every pipeline argument given, the guidance
really used) and every intervention with its counts per block, step and branch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ditf.arch import arch_for
from ditf.errors import InvalidArgumentError
from ditf.io import atomic_path, write_json_atomic, write_text_atomic
from ditf.massive.actions import Action
from ditf.massive.channels import ChannelSpec
from ditf.massive.reference import actions_needing_reference, record_reference, reference_blocks
from ditf.massive.sampling import (
    check_image_size,
    check_pipeline_kwargs,
    pipeline_settings,
    progress_bars,
    provenance,
    seeded,
)
from ditf.massive.scopes import BlockSpec, StepSpec
from ditf.massive.session import intervene
from ditf.massive.transport import Spatial, Transport, record_trajectory


@dataclass(frozen=True)
class TransportPlan:
    """Transport from another prompt's trajectory (same seed and settings) into the generated one.

    channels: the channel set m, picked on the source's stream ('auto', a list, ...; None: every channel);
    store: keep the source on disk (a `.safetensors` path) instead of in memory; signed: K-means on signed values.
    """

    source_prompt: str
    blocks: BlockSpec
    steps: StepSpec = "all"
    channels: ChannelSpec | None = "auto"
    spatial: Spatial = None
    branch: str = "all"
    store: str | os.PathLike[str] | None = None
    signed: bool = False


@dataclass
class GenerationResult:
    """The generated image (PIL), the clean reference image when a reference pass ran, and the record of the run."""

    image: Image.Image
    record: dict[str, Any] = field(default_factory=dict)
    reference_image: Image.Image | None = None


def generate(pipe: Any, prompt: str, *, actions: Sequence[Action] = (), transport: TransportPlan | None = None,
             seed: int = 0, num_inference_steps: int | None = None, height: int | None = None,
             width: int | None = None, guidance_scale: float | None = None, progress: bool = True,
             model: str | None = None, **pipe_kwargs: Any) -> GenerationResult:
    """Run `pipe(prompt, ...)` with `actions` hooked in; return the image (PIL) and what was done.

    actions: edits (`Zero`, `Scale`, ...), `DetailGuidance`, `Record`, ... (see `intervene`). Edits with detected
    channels or controls and no `reference` get one clean pass of the same prompt, seed and settings first
    (`record_reference`, over the union of their blocks); its image is `reference_image`.
    transport: first generates `transport.source_prompt` with the same seed and settings, recording its image
    stream on the channel set m at the plan's blocks and steps, then transports it into this run.
    model: the model reference to record (default: the pipeline's `_name_or_path`). Other keyword arguments go to
    the pipeline unchanged (and into the record).
    """
    check_pipeline_kwargs(pipe_kwargs, "generate()")
    settings = pipeline_settings(num_inference_steps, height, width, guidance_scale)
    arch = arch_for(pipe.transformer, getattr(pipe, "vae", None))
    check_image_size(settings, arch.stride)
    call_kwargs = {**settings, **pipe_kwargs, "output_type": "pil"}
    actions = list(actions)
    record: dict[str, Any] = {"prompt": prompt, "seed": seed, **provenance(pipe, model),
                              "settings": {**settings, **{k: _jsonable(v) for k, v in pipe_kwargs.items()}}}
    reference_image = None
    with progress_bars(pipe, progress):
        needing = actions_needing_reference(actions)
        if needing:
            blocks = reference_blocks(needing, arch)
            output, reference = record_reference(pipe, prompt, blocks=blocks, seed=seed, **call_kwargs)
            for action in needing:
                action.use_reference(reference)
            reference_image = output.images[0]
            record["reference_pass"] = {"prompt": prompt, "seed": seed, "blocks": blocks,
                                        "why": "detected channels and controls come from the unmodified stream"}
        if transport is not None:
            _, source = record_trajectory(pipe, transport.source_prompt, blocks=transport.blocks, steps=transport.steps,
                                          seed=seed, branch=transport.branch, channels=transport.channels,
                                          store=transport.store, **call_kwargs)
            actions.append(Transport(source, spatial=transport.spatial, blocks=transport.blocks, steps=transport.steps,
                                     branch=transport.branch, signed=transport.signed))
            record["transport_source"] = {"prompt": transport.source_prompt, "seed": seed, **source.describe()}
        with intervene(pipe, actions) as session:
            output = pipe(prompt=prompt, **seeded(call_kwargs, seed))
    record["guidance"] = session.runs[-1] if session.runs else None
    record["timesteps"] = {str(step): t for step, t in sorted(session.timesteps.items())}
    record["interventions"] = session.describe()
    return GenerationResult(output.images[0], record, reference_image)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)


def save_image_atomic(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save a PIL image (format from the suffix) through a temporary file in the same folder + os.replace."""
    target = Path(path)
    with atomic_path(target) as temporary:
        image.save(temporary, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
    return target


def save_generation(result: GenerationResult, path: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the image to `path`, the clean reference image (if any) to `<stem>.reference<suffix>`, and the record
    to `<stem>.json` and `<stem>.md` (each linking the images); return the paths."""
    target = Path(path)
    if target.suffix.lower() not in Image.registered_extensions():
        raise InvalidArgumentError(f"output {str(target)!r} has no image suffix; use e.g. out.png.")
    files = {"image": save_image_atomic(result.image, target)}
    record = {**result.record, "image": target.name}
    if result.reference_image is not None:
        reference = target.with_name(f"{target.stem}.reference{target.suffix}")
        files["reference_image"] = save_image_atomic(result.reference_image, reference)
        record["reference_pass"] = {**record.get("reference_pass", {}), "image": reference.name}
    files["record"] = write_json_atomic(target.with_suffix(".json"), record)
    files["markdown"] = write_text_atomic(target.with_suffix(".md"), render_generation(record))
    return files


def render_generation(record: dict[str, Any]) -> str:
    """A Markdown summary of a generation record: images, settings, guidance, interventions and their counts."""
    lines = ["# Generation with interventions", "", f"![generated image]({record['image']})", ""]
    reference = record.get("reference_pass") or {}
    if "image" in reference:
        lines += [f"Clean reference pass (same prompt, seed and settings): ![reference]({reference['image']})", ""]
    lines += ["| setting | value |", "|---|---|"]
    for key in ("prompt", "seed", "model", "pipeline", "dtype", "device", "versions", "settings", "guidance"):
        if key in record:
            lines.append(f"| {key} | {_cell(record[key])} |")
    lines += ["", "## Interventions", ""]
    for action in record.get("interventions", []):
        summary = {k: v for k, v in action.items() if k not in ("log", "disrupted_channels")}
        lines.append(f"- {_cell(summary)}")
    lines += ["", "Per block, step and branch: the `log` of each intervention in the JSON record.", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_cell(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(item) for item in value)
    return str(value).replace("|", "\\|")


__all__ = ["GenerationResult", "TransportPlan", "generate", "render_generation", "save_generation",
           "save_image_atomic"]
