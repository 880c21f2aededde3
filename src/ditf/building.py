"""Building diffusers DiT transformers from their configs: which class, which diffusers, which blocks.

Shared by loading from folders and hubs (`ditf.loading`) and from single files (`ditf.single_file`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ditf.arch import adapters
from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from ditf.model_files import read_json
from ditf.versions import supported_diffusers


def diffusers_dtype(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The dtype keyword for diffusers' `from_pretrained`: `dtype` since 0.42 (`torch_dtype` is deprecated
    there), `torch_dtype` before; nothing when `dtype` is None."""
    import diffusers
    from packaging.version import Version

    if dtype is None:
        return {}
    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}




def check_diffusers_version(version: str | None = None) -> None:
    """Fail with the fix when the installed diffusers (or `version`) is outside ditf's supported range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import diffusers

        version = diffusers.__version__
    wanted = supported_diffusers()
    try:
        supported = Version(version) in SpecifierSet(wanted, prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedLayoutError(
            f"diffusers {version} is installed, but ditf supports diffusers{wanted} (the block layouts its adapters "
            f"hook). Install a supported version: pip install 'diffusers{wanted}'."
        )


def transformer_class(folder: Path) -> type[nn.Module]:
    """The diffusers transformer class named by `folder/config.json`; errors when it is not a supported DiT."""
    import diffusers

    config_file = folder / "config.json"
    if not config_file.exists():
        raise UnknownModelError(f"{str(folder)!r} has no config.json: it is not a diffusers transformer folder.")
    config = read_json(config_file, "the transformer config")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in adapters():
        raise UnknownModelError(not_a_dit(str(folder), name))
    return getattr(diffusers, name)


def not_a_dit(model: str, class_name: str | None, found: str | None = None) -> str:
    """The error message for a model that is no supported DiT: what was `found` (default: its transformer class
    `class_name`, or that it has no diffusers config), the supported classes, and what to pass instead."""
    if found is None:
        found = f"its transformer is {class_name}" if class_name else "it has neither model_index.json nor config.json"
    return (
        f"{model!r} is not a supported DiT: {found}. Supported transformer classes: {', '.join(sorted(adapters()))}. "
        "Pass a diffusers pipeline folder, a transformer folder, or a preset alias."
    )


def build_prefix(cls: type[nn.Module], config: dict, block: int | None) -> nn.Module:
    """`cls` built from its real `config` on the meta device, with blocks after global index `block` replaced by
    `nn.Identity` (kept in place so that block counts, offsets and skips stay those of the full model).
    `block=None` keeps every block."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    if block is None:
        return model
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
