"""From a model name to loaded diffusers components: alias, hub id, local folder or single file.

Only the transformer's blocks 0..k are read when a block k is given: the model is built on the meta
device from its real config (so every offset and skip connection is what the full model has), blocks
after k become `nn.Identity` placeholders, and only the needed tensors are read from the safetensors
files, chosen by the folder's `*.safetensors.index.json` and the weight `variant` (e.g. "fp16"), so a folder
holding several variants is read once. Single files go through `ditf.single_file`. Hub pipelines are fetched
with `DiffusionPipeline.download` (only the files of the chosen variant), honouring `HF_HUB_OFFLINE` as set at
call time, and loading refuses diffusers versions outside the range in ditf's package metadata.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditf.arch import adapters
from ditf.building import build_prefix, check_diffusers_version, diffusers_dtype, not_a_dit, transformer_class
from ditf.errors import UnknownModelError
from ditf.fingerprint import hub_offline
from ditf.model_files import check_pipeline_folder, check_safetensors, read_json
from ditf.registry import Preset, all_presets, preset_for
from ditf.single_file import load_single_file, resolve_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class LoadedComponents:
    """What a featurizer needs: the transformer, its VAE, a pipeline holding the text stack, the preset."""

    transformer: nn.Module
    vae: nn.Module | None
    pipeline: Any
    preset: Preset | None


def load_components(model: str, *, torch_dtype: torch.dtype | None = None, block: int | None = None,
                    config: str | None = None, token: str | None = None, revision: str | None = None,
                    variant: str | None = None) -> LoadedComponents:
    """Resolve `model` and load its components.

    `model` is a preset alias (`flux-dev`), a hub id (`owner/name`), a local diffusers pipeline folder
    (with `model_index.json`), a bare transformer folder (with `config.json`), or a single-file checkpoint
    (then `config` names a local folder holding the diffusers `config.json`). `block` limits the
    transformer to blocks 0..block. `variant` picks weight files such as `*.fp16.safetensors`. Honours
    `HF_HUB_OFFLINE`.
    """
    check_diffusers_version()
    preset = all_presets().get(model)
    source = preset.hub_id if preset is not None else model
    preset = preset or preset_for(source)
    path = Path(source).expanduser()
    if path.is_file():
        transformer = load_single_file(path, config=config, torch_dtype=torch_dtype, block=block)
        pipeline_folder = resolve_config(config, path).pipeline
        if pipeline_folder is not None:
            return load_pipeline(pipeline_folder, transformer, torch_dtype=torch_dtype, preset=preset, variant=variant)
        return LoadedComponents(transformer, None, None, preset)
    if path.is_dir():
        folder = path
    elif _looks_like_path(source):
        raise UnknownModelError(_unknown_model(model))
    else:
        folder = download(source, token=token, revision=revision, variant=variant)
    return load_folder(folder, torch_dtype=torch_dtype, block=block, preset=preset, model=model, variant=variant)


def check_model_reference(model: str) -> None:
    """Refuse a model reference that is no alias, no existing path and not shaped like a hub id (owner/name),
    suggesting the closest aliases."""
    if model in all_presets() or Path(model).expanduser().exists():
        return
    if _looks_like_path(model):
        raise UnknownModelError(_unknown_model(model))


def check_model(model: str, *, needs: tuple[str, ...] = ("transformer",), config: str | None = None) -> None:
    """Before anything loads: the reference resolves (`check_model_reference`), a local model has the components
    a run `needs` ("transformer", "vae", ...), and every component its `model_index.json` lists is there and
    readable (`ditf.model_files`). Hub ids and aliases are checked when they are downloaded."""
    check_model_reference(model)
    preset = all_presets().get(model)
    path = Path(preset.hub_id if preset is not None else model).expanduser()
    if path.is_file():
        pipeline = resolve_config(config, path).pipeline
        if pipeline is None and set(needs) - {"transformer"}:
            raise UnknownModelError(
                f"{model!r} is a single-file transformer and config={config!r} names only its config, but this run "
                f"needs {', '.join(sorted(set(needs) - {'transformer'}))}: pass config=<a pipeline folder> (with "
                "model_index.json, vae/, ...) to load them with it."
            )
        if pipeline is not None:
            check_pipeline_folder(pipeline, set(needs) - {"transformer"})
        return
    if not path.is_dir():
        return
    if (path / "model_index.json").exists():
        check_pipeline_folder(path, needs)
    elif set(needs) - {"transformer"}:
        raise UnknownModelError(
            f"{model!r} is a bare transformer folder, but this run needs {', '.join(sorted(set(needs) - {'transformer'}))}"
            f": pass the pipeline folder around it (with model_index.json), or pass latents (from_latents)."
        )


def _unknown_model(model: str) -> str:
    """Message for a `model` that is no alias, no existing path and not shaped like a hub id."""
    if "/" not in model and "\\" not in model and not Path(model).suffix:
        close = difflib.get_close_matches(model, list(all_presets()), n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        return (
            f"unknown model alias {model!r}.{hint} Known aliases: {', '.join(all_presets())}; or pass a Hugging Face hub "
            "id (owner/name), a local diffusers folder or a single-file checkpoint."
        )
    return (
        f"model {model!r}: no such file or folder. Pass a preset alias ({', '.join(all_presets())}), a hub id "
        "(owner/name), a local diffusers folder or a single-file checkpoint."
    )


def load_folder(folder: Path, *, torch_dtype: torch.dtype | None, block: int | None, preset: Preset | None,
                model: str, variant: str | None = None) -> LoadedComponents:
    """Load a local diffusers pipeline folder or a bare transformer folder."""
    if (folder / "model_index.json").exists():
        index = read_json(folder / "model_index.json", "the pipeline index")
        if not isinstance(index, dict) or "transformer" not in index:
            parts = ", ".join(f"{name}: {spec[1]}" for name, spec in index.items()
                              if not name.startswith("_") and isinstance(spec, list) and spec[1] is not None)
            raise UnknownModelError(not_a_dit(model, None, f"its model_index.json has no transformer ({parts})"))
        transformer_class = index["transformer"][1]
        if transformer_class not in adapters():
            raise UnknownModelError(not_a_dit(model, transformer_class))
        check_pipeline_folder(folder)  # every listed component is there and readable, before any weight is read
        transformer = load_transformer(folder / "transformer", block=block, torch_dtype=torch_dtype, variant=variant)
        return load_pipeline(folder, transformer, torch_dtype=torch_dtype, preset=preset, variant=variant)
    if (folder / "config.json").is_file():
        transformer = load_transformer(folder, block=block, torch_dtype=torch_dtype, variant=variant)
        return LoadedComponents(transformer, None, None, preset)
    raise UnknownModelError(not_a_dit(model, None))


def load_pipeline(folder: Path, transformer: nn.Module, *, torch_dtype: torch.dtype | None,
                  preset: Preset | None, variant: str | None = None) -> LoadedComponents:
    """The diffusers pipeline in `folder` (VAE, text encoders, tokenizers) around an already loaded `transformer`.

    Components saved as absent (`[null, null]` in model_index.json, e.g. a pipeline kept without its text
    encoders to be used with `prompt_embeds`) stay None.
    """
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    absent = {name: None for name, spec in index.items() if not name.startswith("_") and spec == [None, None]}
    pipeline = DiffusionPipeline.from_pretrained(folder, transformer=transformer, variant=variant,
                                                 **diffusers_dtype(torch_dtype), **absent)
    return LoadedComponents(transformer, getattr(pipeline, "vae", None), pipeline, preset)


def _looks_like_path(source: str) -> bool:
    """True unless `source` has the shape of a hub id, `owner/name`."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source).suffix in (".safetensors", ".sft")


def load_transformer(folder: Path, *, block: int | None = None, torch_dtype: torch.dtype | None = None,
                     variant: str | None = None) -> nn.Module:
    """Load the transformer in `folder`; with `block`, only blocks 0..block are read (later ones are placeholders).

    Weights are cast to `torch_dtype`; without it they come out float32 either way (as diffusers'
    `from_pretrained` does), so `block` never changes the dtype. `variant` picks `*.<variant>.safetensors`.
    """
    check_diffusers_version()
    cls = transformer_class(folder)
    files = weight_files(folder, variant)
    for file in files:
        check_safetensors(file)
    if block is None:
        return cls.from_pretrained(folder, variant=variant, **diffusers_dtype(torch_dtype)).eval()
    model = build_prefix(cls, cls.load_config(folder), block)
    return load_prefix_weights(model, files, torch_dtype)


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files holding a diffusers model's weights in `folder`, for `variant` (None: the default
    files): the shards listed by `diffusion_pytorch_model.safetensors.index[.<variant>].json`, else the single
    `diffusion_pytorch_model[.<variant>].safetensors`. Other variants in the folder are never read."""
    index = folder / _with_variant(WEIGHTS_INDEX_NAME, variant)
    single = folder / _with_variant(WEIGHTS_NAME, variant)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UnknownModelError(f"{index} is not a safetensors index (no 'weight_map'); download it again.") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise UnknownModelError(f"{index.name} lists shards that are missing from {folder}: {missing}; download them.")
        return files
    if single.is_file():
        return [single]
    present = sorted(path.name for path in folder.glob("*.safetensors"))
    variants = sorted({name.split(".")[-2] for name in present if name.count(".") >= 2})
    hint = f" It holds the variants {variants}: pass variant=... (--variant)." if variants else ""
    raise UnknownModelError(
        f"{str(folder)!r} has no {single.name} (nor {index.name}); ditf reads diffusers safetensors weights."
        f"{hint if variant is None else ''} Files there: {present or 'no .safetensors'}."
    )


def _with_variant(name: str, variant: str | None) -> str:
    """`diffusion_pytorch_model.safetensors` -> `diffusion_pytorch_model.fp16.safetensors` (diffusers' naming)."""
    if variant is None:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def load_prefix_weights(model: nn.Module, files: list[Path], torch_dtype: torch.dtype | None) -> nn.Module:
    """Fill a meta-device `model` with the tensors it needs from safetensors `files`, and nothing else.

    Every parameter and buffer the model has must be found with its shape (strict), else the checkpoint
    does not match its config. Floating tensors become `torch_dtype`, or the model's own dtype (float32).
    """
    from safetensors import safe_open

    wanted = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in wanted:
                    continue
                shape = list(handle.get_slice(key).get_shape())
                if shape != list(wanted[key].shape):
                    raise UnknownModelError(
                        f"{file.name}: tensor {key} has shape {shape}, but config.json describes {list(wanted[key].shape)}; "
                        "the weights and config.json come from different models."
                    )
                state[key] = _cast(handle.get_tensor(key), torch_dtype or wanted[key].dtype)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise UnknownModelError(
            f"the checkpoint lacks {len(missing)} tensors this {type(model).__name__} needs (first: {missing[:3]}); "
            "it does not match its config.json."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def download(hub_id: str, *, token: str | None = None, revision: str | None = None, variant: str | None = None) -> Path:
    """Local snapshot of a hub repository with the files loading needs, and errors that say what to do.

    A pipeline repository (with `model_index.json`) is fetched by `DiffusionPipeline.download`: only its
    components' configs, tokenizers and the safetensors weights of `variant`. A bare transformer repository gets
    its config and the weights of `variant`. With `HF_HUB_OFFLINE` set, only the local cache is read and no
    connection is attempted.
    """
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        try:
            huggingface_hub.hf_hub_download(hub_id, "model_index.json", token=token, revision=revision,
                                            local_files_only=offline)
            is_pipeline = True
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:  # the repository has no model_index.json: a bare transformer
            is_pipeline = False
        if is_pipeline:
            from diffusers import DiffusionPipeline

            return Path(DiffusionPipeline.download(hub_id, token=token, revision=revision, variant=variant,
                                                   use_safetensors=True, local_files_only=offline))
        weights = [_with_variant(WEIGHTS_NAME, variant), _with_variant(WEIGHTS_INDEX_NAME, variant),
                   f"diffusion_pytorch_model{'.' + variant if variant else ''}-*.safetensors"]
        return Path(huggingface_hub.snapshot_download(hub_id, token=token, revision=revision, local_files_only=offline,
                                                      allow_patterns=["config.json", *weights]))
    except GatedRepoError as err:
        raise UnknownModelError(
            f"{hub_id!r} is gated: accept its licence on https://huggingface.co/{hub_id} with your account, then set "
            "the HF_TOKEN environment variable to an access token of that account (or pass token=...)."
        ) from err
    except RepositoryNotFoundError as err:
        raise UnknownModelError(
            f"{hub_id!r} is not a model on the Hugging Face hub (or it is private: set HF_TOKEN). "
            f"Known aliases: {', '.join(all_presets())}."
        ) from err
    except (LocalEntryNotFoundError, OSError) as err:
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UnknownModelError(
            f"{hub_id!r} is not (completely) in the local Hugging Face cache and {reason}. Download it first on a "
            f"connected machine: `hf download {hub_id}` (into the same HF_HOME cache), or pass a local folder."
        ) from err


__all__ = ["LoadedComponents", "build_prefix", "check_diffusers_version", "download",
           "load_components", "load_folder", "load_pipeline", "load_transformer", "weight_files"]
