"""Checks of a planned run against the model, before any weight is loaded or any step is sampled.

A model outline is what ditf knows without the weights: the pipeline class (from `model_index.json`) and the
transformer built on the meta device from its config, with its family adapter (blocks, width, CFG layouts).
`check_plan` refuses blocks, steps, channels and CFG branches the run cannot have, with the fix; the same
checks run on a loaded pipeline (`outline_pipeline`) for models that are not local folders.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditf.arch import ArchSpec, arch_for
from ditf.errors import InvalidArgumentError
from ditf.massive.channels import ChannelSelector
from ditf.massive.scopes import BlockSpec, Steps, StepSpec, parse_branches, resolve_blocks
from ditf.massive.signals import call_arguments
from ditf.registry import PRESETS


@dataclass(frozen=True)
class ModelOutline:
    """A model known without its weights: its diffusers pipeline class (None if unknown) and transformer adapter."""

    pipeline_class: type | None
    arch: ArchSpec

    @property
    def pipeline_name(self) -> str:
        return self.pipeline_class.__name__ if self.pipeline_class is not None else "the pipeline"


def outline_model(model: str | os.PathLike[str]) -> ModelOutline | None:
    """The outline of a local diffusers pipeline folder (or an alias of one); None for anything else (hub ids and
    single files are checked once loaded, with `outline_pipeline`). Builds the transformer on the meta device."""
    import diffusers

    from ditf.building import build_prefix, transformer_class
    from ditf.model_files import read_json

    preset = PRESETS.get(str(model))
    folder = Path(preset.hub_id if preset is not None else model).expanduser()
    if not (folder / "model_index.json").is_file() or not (folder / "transformer" / "config.json").is_file():
        return None
    index = read_json(folder / "model_index.json", "the pipeline index")
    name = index.get("_class_name") if isinstance(index, dict) else None
    pipeline_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    cls = transformer_class(folder / "transformer")
    transformer = build_prefix(cls, cls.load_config(folder / "transformer"), None)
    return ModelOutline(pipeline_class if isinstance(pipeline_class, type) else None, arch_for(transformer))


def outline_pipeline(pipe: Any) -> ModelOutline:
    """The outline of a loaded pipeline."""
    return ModelOutline(type(pipe), arch_for(pipe.transformer, getattr(pipe, "vae", None)))


def planned_arguments(pipeline_class: type | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a call of `pipeline_class` with `given` keyword arguments will run with (defaults filled in);
    refuses an argument the pipeline does not take."""
    if pipeline_class is None:
        return dict(given)
    signature = inspect.signature(pipeline_class.__call__)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(given) - set(signature.parameters)) if not takes_any else []
    if unknown:
        known = sorted(name for name in signature.parameters if name != "self")
        raise InvalidArgumentError(
            f"pipeline_option={unknown[0]!r} is not an argument of {pipeline_class.__name__}; it takes "
            f"{', '.join(known)}."
        )
    bound = signature.bind_partial(None, **given)
    bound.apply_defaults()
    return call_arguments(signature, bound.arguments)


def check_plan(outline: ModelOutline, *, given: Mapping[str, Any], blocks: BlockSpec | None = None,
               steps: StepSpec | None = None, branch: str | Iterable[str] | None = None,
               channels: ChannelSelector | None = None, one_block: bool = False) -> dict[str, Any]:
    """Refuse a run that cannot do what it was asked, before it starts; return the planned call arguments.

    given: the keyword arguments of the pipeline call; blocks / steps: the scope; branch: the CFG branch(es) the
    run must record or edit ('uncond' needs a run with an unconditional branch); channels: fixed channels are
    checked against the width; one_block: the scope must be a single block (Detail Guidance's m).
    """
    arguments = planned_arguments(outline.pipeline_class, given)
    if blocks is not None:
        chosen = resolve_blocks(blocks, outline.arch)
        if one_block and len(chosen) != 1:
            raise InvalidArgumentError(f"blocks={blocks!r}: Detail Guidance disrupts one block m; pass one index.")
    total = arguments.get("num_inference_steps")
    if steps is not None and isinstance(total, int) and not isinstance(total, bool):
        Steps.parse(steps).check(total)
    if branch is not None:
        check_branch(outline, branch, arguments)
    width = outline.arch.width
    if channels is not None and width is not None and not channels.needs_statistics:
        channels.select(width)
    return arguments


def check_branch(outline: ModelOutline, branch: str | Iterable[str], arguments: Mapping[str, Any]) -> None:
    """Refuse a scope on the unconditional branch of a call that runs none (e.g. FLUX.1-dev without true CFG)."""
    wanted = parse_branches(branch)
    if wanted is None or "uncond" not in wanted or outline.pipeline_class is None:
        return
    layout = outline.arch.cfg_layout(outline.pipeline_class)
    if layout is None or layout.cfg_scale(arguments) is not None:
        return
    if layout.kind == "none" or layout.scale_argument is None:
        how = "it runs no classifier-free guidance (its guidance, if any, is embedded in the model)"
        fix = "use branch='cond'"
    else:
        needs = f" and a {' or '.join(layout.negative_arguments)}" if layout.negative_arguments else ""
        how = (f"it runs an unconditional branch only when {layout.scale_argument} > 1{needs} "
               f"({layout.scale_argument}={arguments.get(layout.scale_argument)!r})")
        fix = f"pass {layout.scale_argument} > 1{needs}, or use branch='cond'"
    raise InvalidArgumentError(f"branch={branch!r}: {outline.pipeline_name} has no unconditional branch here: {how}; "
                               f"{fix}.")


__all__ = ["ModelOutline", "check_branch", "check_plan", "outline_model", "outline_pipeline", "planned_arguments"]
