"""Single-file transformer checkpoints (one `.safetensors` file) -> a diffusers transformer, offline.

A single file holds weights only, so the model is built from a local diffusers config (`config=`: a
transformer folder with `config.json`, or a pipeline folder with `transformer/config.json`); ditf never
fetches one from the hub. Two key layouts are read:

- diffusers' own names (a `diffusion_pytorch_model.safetensors` passed on its own);
- a family's original release layout, when its adapter provides `original_key_map` (FLUX.1: Black Forest
  Labs' `double_blocks.N...`), converted tensor by tensor, for any model width.

All-in-one files (ComfyUI) keep the transformer under `model.diffusion_model.`; only those keys are read.
With `block=k` only the tensors of blocks 0..k and of the embedders are read (rows of fused tensors are
read as slices), so the rest of the file is never loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditf.arch.checkpoints import TensorSource
from ditf.building import build_prefix, check_diffusers_version, transformer_class
from ditf.model_files import check_safetensors
from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError

ALL_IN_ONE_PREFIX = "model.diffusion_model."
"""Prefix of the transformer's keys in all-in-one checkpoints (ComfyUI, original LDM-style files)."""

DIFFUSERS_LAYOUT = "diffusers"


@dataclass(frozen=True)
class ConfigFolders:
    """Where a single file's config lives: the transformer config folder, and the pipeline folder around it
    when `config=` named a whole pipeline (its VAE and text encoders are then loaded too)."""

    transformer: Path
    pipeline: Path | None


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint's key layout: its name, the key prefix to add when reading, and diffusers key -> source."""

    name: str
    prefix: str
    key_map: dict[str, TensorSource]


def resolve_config(config: str | Path | None, checkpoint: str | Path = "the checkpoint") -> ConfigFolders:
    """The local config folders named by `config=` for a single-file checkpoint; errors say how to get one."""
    how = (
        "Pass config=<local folder> holding the model's diffusers config.json (a transformer folder), or a "
        "pipeline folder with transformer/config.json; e.g. `hf download black-forest-labs/FLUX.1-dev "
        "--include 'transformer/config.json' --local-dir DIR`, then config=DIR. ditf never fetches a config "
        "from the hub for single files."
    )
    if config is None:
        raise InvalidArgumentError(f"{str(checkpoint)!r} is a single-file checkpoint without a config. {how}")
    folder = Path(config).expanduser()
    if folder.is_file() and folder.name == "config.json":
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidArgumentError(f"config={str(config)!r} is not a local folder. {how}")
    if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
        return ConfigFolders(folder / "transformer", folder)
    if (folder / "config.json").is_file():
        return ConfigFolders(folder, None)
    if (folder / "transformer" / "config.json").is_file():
        return ConfigFolders(folder / "transformer", None)
    raise InvalidArgumentError(f"config={str(config)!r} holds neither config.json nor transformer/config.json. {how}")


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor key of a safetensors file with its shape, read from the header only (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as err:
        raise UnknownModelError(
            f"{str(path)!r} is not a readable safetensors file ({err}). ditf reads single-file checkpoints in "
            "safetensors format only; convert .ckpt/.pt files with `safetensors.torch.save_file` first."
        ) from err


def detect_layout(shapes: Mapping[str, Sequence[int]], model: nn.Module) -> CheckpointLayout:
    """Recognise the key layout of a checkpoint (keys -> shapes) holding the transformer `model` (any device).

    diffusers layout when the file holds the model's own non-block keys (embedders, final layer); else the
    adapter's original layout (e.g. BFL FLUX.1) when it recognises the keys; else `UnsupportedLayoutError`
    naming what was found.
    """
    from ditf.arch import adapters

    adapter = adapters()[type(model).__name__]
    prefix = ALL_IN_ONE_PREFIX if any(key.startswith(ALL_IN_ONE_PREFIX) for key in shapes) else ""
    stripped = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    block_lists = tuple(f"{stage}." for stage in adapter.stages)
    diffusers_markers = [key for key in model.state_dict() if not key.startswith(block_lists)]
    if any(key in stripped for key in diffusers_markers):
        return CheckpointLayout(DIFFUSERS_LAYOUT, prefix, {key: TensorSource(key) for key in stripped})
    original_key_map = adapter.original_key_map
    key_map = original_key_map(stripped) if original_key_map is not None else None
    if key_map is not None:
        return CheckpointLayout(adapter.original_layout, prefix, key_map)
    known = [f"diffusers {type(model).__name__} (e.g. {', '.join(diffusers_markers[:2])})"]
    if original_key_map is not None:
        known.append(adapter.original_layout)
    raise UnsupportedLayoutError(
        f"the checkpoint's {len(shapes)} keys (e.g. {', '.join(sorted(shapes)[:4])}) are in no layout ditf "
        f"reads for {type(model).__name__}; known layouts: {'; '.join(known)}. Check that config= describes this "
        "checkpoint's model, or convert the file to diffusers with its family's conversion script."
    )


def load_single_file(path: str | Path, config: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                     block: int | None = None) -> nn.Module:
    """Load the transformer stored in one safetensors file, offline, in eval mode.

    `config` is a local folder with the diffusers `config.json` (or a pipeline folder with
    `transformer/config.json`). `block` (global index k) builds the full model on the meta device and reads
    only the tensors of blocks 0..k plus the non-block modules; later blocks are `nn.Identity` placeholders.
    Weights are cast to `torch_dtype` (default float32, as diffusers' `from_pretrained`).
    """
    check_diffusers_version()
    path = Path(path).expanduser()
    if not path.is_file():
        raise UnknownModelError(f"single-file checkpoint {str(path)!r} does not exist; pass the path of a .safetensors file.")
    folders = resolve_config(config, path)
    cls = transformer_class(folders.transformer)
    shapes = read_shapes(path)
    check_safetensors(path)
    model = build_prefix(cls, cls.load_config(folders.transformer), block)
    layout = detect_layout(shapes, model)
    state = read_checkpoint(path, layout, model, shapes, torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_checkpoint(path: Path, layout: CheckpointLayout, model: nn.Module, shapes: Mapping[str, Sequence[int]],
                    torch_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict of meta-device `model` (blocks after k already placeholders) read from `path`.

    Checks before reading any tensor: every parameter has a source of the same shape, and every tensor of
    the file belongs to the model (or to a block that is not loaded); errors name the first mismatches.
    """
    from safetensors import safe_open

    from ditf.arch import adapters

    wanted = model.state_dict()
    _check_coverage(path, layout, wanted, _dropped_block_prefixes(model, adapters()[type(model).__name__].stages), shapes)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key, target in wanted.items():
            tensor = layout.key_map[key].read(handle, layout.prefix)
            dtype = torch_dtype or target.dtype
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _dropped_block_prefixes(model: nn.Module, stages: Sequence[str]) -> tuple[str, ...]:
    """`stage.i.` for every block replaced by a placeholder (its tensors are skipped, not missing)."""
    return tuple(f"{stage}.{i}." for stage in stages for i, block in enumerate(getattr(model, stage))
                 if isinstance(block, nn.Identity))


def _check_coverage(path: Path, layout: CheckpointLayout, wanted: Mapping[str, torch.Tensor],
                    dropped: tuple[str, ...], shapes: Mapping[str, Sequence[int]]) -> None:
    name = f"{path.name} ({layout.name} layout)"
    fix = "config= must describe this checkpoint's model (same width, depth and options)."
    missing = [key for key in wanted if key not in layout.key_map]
    if missing:
        raise InvalidArgumentError(
            f"{name} lacks {len(missing)} tensors that the model of config.json has (first: {missing[:3]}). {fix}"
        )
    extra = [key for key in layout.key_map if key not in wanted and not key.startswith(dropped)]
    if extra:
        raise InvalidArgumentError(
            f"{name} holds {len(extra)} tensors that the model of config.json does not have (first: {extra[:3]}). {fix}"
        )
    used = {source.key for source in layout.key_map.values()}
    stripped = [key[len(layout.prefix):] for key in shapes if key.startswith(layout.prefix)]
    unknown = [key for key in stripped if key not in used]
    if unknown:
        raise UnsupportedLayoutError(
            f"{name} holds {len(unknown)} tensors that ditf does not know where to put (first: {unknown[:3]}); "
            "it is not a plain transformer checkpoint in this layout (a LoRA, a quantised or a different variant?). "
            "Convert it to diffusers with the tool that made it."
        )
    for key, target in wanted.items():
        source = layout.key_map[key]
        got = source.shape(shapes[layout.prefix + source.key])
        if got != tuple(target.shape):
            raise InvalidArgumentError(
                f"{name}: tensor {key} (from {source.key}) has shape {list(got)}, but the model of config.json "
                f"needs {list(target.shape)}. {fix}"
            )


__all__ = ["CheckpointLayout", "ConfigFolders", "TensorSource", "detect_layout", "load_single_file", "read_shapes",
           "resolve_config"]
