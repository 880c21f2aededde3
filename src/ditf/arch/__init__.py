"""One adapter per DiT family; `arch_for` picks the one that handles a loaded transformer."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from torch import nn

from ditf.arch.base import ArchSpec, BlockInputs, BlockRef, CfgLayout, Conditioning
from ditf.errors import UnsupportedLayoutError

__all__ = ["ArchSpec", "BlockInputs", "BlockRef", "CfgLayout", "Conditioning", "adapters", "arch_for"]


def adapters() -> dict[str, type[ArchSpec]]:
    """Every adapter class shipped in `ditf.arch`, keyed by the diffusers transformer class it handles."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[ArchSpec]] = {}
    pending = list(ArchSpec.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        for name in getattr(cls, "transformer_classes", ()):
            found[name] = cls
    return found


def arch_for(transformer: nn.Module, vae: nn.Module | None = None,
             scheduler_config: Mapping[str, Any] | None = None) -> ArchSpec:
    """Bind the adapter of `transformer`'s family to it (and to its VAE and its pipeline's scheduler config, if
    given; DDPM families noise latents with that schedule)."""
    known = adapters()
    name = next((cls.__name__ for cls in type(transformer).__mro__ if cls.__name__ in known), None)
    if name is None:
        raise UnsupportedLayoutError(
            f"{type(transformer).__name__} is not a DiT family ditf supports; supported transformer classes (and "
            f"their subclasses): {', '.join(sorted(known))}."
        )
    return known[name](transformer, vae, scheduler_config)
