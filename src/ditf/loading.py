"""From a model name to loaded diffusers components: alias, hub id, local folder or single file.

Only the transformer's blocks 0..k are read when a block k is given: the model is built on the meta
device from its real config (so every offset and skip connection is what the full model has), blocks
after k become `nn.Identity` placeholders, and only the needed tensors are read from the safetensors
files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditf.arch import adapters
from ditf.errors import InvalidArgumentError, UnknownModelError
from ditf.registry import PRESETS, Preset, preset_for_hub_id


@dataclass
class LoadedComponents:
    """What a featurizer needs: the transformer, its VAE, a pipeline holding the text stack, the preset."""

    transformer: nn.Module
    vae: nn.Module | None
    pipeline: Any
    preset: Preset | None


def load_components(model: str, *, torch_dtype: torch.dtype | None = None, block: int | None = None,
                    config: str | None = None, token: str | None = None, revision: str | None = None) -> LoadedComponents:
    """Resolve `model` and load its components.

    `model` is a preset alias (`flux-dev`), a hub id (`owner/name`), a local diffusers pipeline folder
    (with `model_index.json`), a bare transformer folder (with `config.json`), or a single-file checkpoint
    (then `config` names a local folder holding the diffusers `config.json`). `block` limits the
    transformer to blocks 0..block. Honours `HF_HUB_OFFLINE`.
    """
    preset = PRESETS.get(model)
    source = preset.hub_id if preset is not None else model
    path = Path(source).expanduser()
    if path.is_file():
        from ditf.single_file import load_single_file

        transformer = load_single_file(path, config=config, torch_dtype=torch_dtype, block=block)
        return LoadedComponents(transformer, None, None, preset)
    if path.is_dir():
        folder = path
    elif _looks_like_path(source):
        raise UnknownModelError(
            f"model {model!r}: no such file or folder. Pass a preset alias ({', '.join(PRESETS)}), a hub id "
            "(owner/name), a local diffusers folder or a single-file checkpoint."
        )
    else:
        folder = download(source, token=token, revision=revision)
        preset = preset or preset_for_hub_id(source)
    return load_folder(folder, torch_dtype=torch_dtype, block=block, preset=preset, model=model)


def load_folder(folder: Path, *, torch_dtype: torch.dtype | None, block: int | None, preset: Preset | None,
                model: str) -> LoadedComponents:
    """Load a local diffusers pipeline folder or a bare transformer folder."""
    if (folder / "model_index.json").is_file():
        index = json.loads((folder / "model_index.json").read_text())
        transformer_class = index.get("transformer", [None, None])[1]
        if transformer_class not in adapters():
            raise UnknownModelError(_not_a_dit(model, transformer_class))
        transformer = load_transformer(folder / "transformer", block=block, torch_dtype=torch_dtype)
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(folder, transformer=transformer, torch_dtype=torch_dtype)
        return LoadedComponents(transformer, getattr(pipeline, "vae", None), pipeline, preset)
    if (folder / "config.json").is_file():
        transformer = load_transformer(folder, block=block, torch_dtype=torch_dtype)
        return LoadedComponents(transformer, None, None, preset)
    raise UnknownModelError(_not_a_dit(model, None))


def _not_a_dit(model: str, class_name: str | None) -> str:
    found = f"its transformer is {class_name}" if class_name else "it has neither model_index.json nor config.json"
    return (
        f"{model!r} is not a supported DiT: {found}. Supported transformer classes: {', '.join(sorted(adapters()))}. "
        "Pass a diffusers pipeline folder, a transformer folder, or a preset alias."
    )


def _looks_like_path(source: str) -> bool:
    """True unless `source` has the shape of a hub id, `owner/name`."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source).suffix in (".safetensors", ".sft")


def transformer_class(folder: Path) -> type[nn.Module]:
    """The diffusers transformer class named by `folder/config.json`; errors when it is not a supported DiT."""
    import diffusers

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UnknownModelError(f"{str(folder)!r} has no config.json: it is not a diffusers transformer folder.")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in adapters():
        raise UnknownModelError(_not_a_dit(str(folder), name))
    return getattr(diffusers, name)


def load_transformer(folder: Path, *, block: int | None = None, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Load the transformer in `folder`; with `block`, only blocks 0..block are read (later ones are placeholders)."""
    cls = transformer_class(folder)
    if block is None:
        return cls.from_pretrained(folder, torch_dtype=torch_dtype).eval()
    model = build_prefix(cls, cls.load_config(folder), block)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnknownModelError(f"{str(folder)!r} has no .safetensors weights; ditf reads safetensors only.")
    return load_prefix_weights(model, files, torch_dtype)


def build_prefix(cls: type[nn.Module], config: dict, block: int) -> nn.Module:
    """`cls` built from its real `config` on the meta device, with blocks after global index `block` replaced by
    `nn.Identity` (kept in place so that block counts, offsets and skips stay those of the full model)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    lists = [getattr(model, stage) for stage in adapters()[cls.__name__].stages]
    total = sum(len(blocks) for blocks in lists)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < total:
        raise InvalidArgumentError(f"block={block!r} is out of range for {cls.__name__}: valid blocks are 0..{total - 1}.")
    start = 0
    for blocks in lists:
        for local in range(len(blocks)):
            if start + local > block:
                blocks[local] = nn.Identity()
        start += len(blocks)
    return model


def load_prefix_weights(model: nn.Module, files: list[Path], torch_dtype: torch.dtype | None) -> nn.Module:
    """Fill a meta-device `model` with the tensors it needs from safetensors `files`, and nothing else.

    Every parameter and buffer the model has must be found (strict), else the checkpoint does not match.
    """
    from safetensors import safe_open

    wanted = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    state[key] = _cast(handle.get_tensor(key), torch_dtype)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise UnknownModelError(
            f"the checkpoint lacks {len(missing)} tensors this {type(model).__name__} needs (first: {missing[:3]}); "
            "it does not match its config.json."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def download(hub_id: str, *, token: str | None = None, revision: str | None = None) -> Path:
    """Local snapshot of a hub repository (from the cache in offline mode), with errors that say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(hub_id, token=token, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]))
    except GatedRepoError as err:
        raise UnknownModelError(
            f"{hub_id!r} is gated: accept its licence on huggingface.co/{hub_id} and set HF_TOKEN (or pass token=...)."
        ) from err
    except RepositoryNotFoundError as err:
        raise UnknownModelError(
            f"{hub_id!r} is not a model on the Hugging Face hub (or it is private: set HF_TOKEN). "
            f"Known aliases: {', '.join(PRESETS)}."
        ) from err
    except LocalEntryNotFoundError as err:
        raise UnknownModelError(
            f"{hub_id!r} is not in the local Hugging Face cache and the hub cannot be reached (offline mode or no "
            f"network). Download it first on a connected machine: `huggingface-cli download {hub_id}`, or pass a "
            "local folder."
        ) from err


__all__ = ["LoadedComponents", "download", "load_components", "load_transformer"]
