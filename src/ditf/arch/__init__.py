"""One adapter per DiT family; `arch_for` picks the one that handles a loaded transformer."""

from __future__ import annotations

import importlib
import pkgutil

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


def arch_for(transformer: nn.Module, vae: nn.Module | None = None) -> ArchSpec:
    """Bind the adapter of `transformer`'s family to it (and to its VAE, if given)."""
    known = adapters()
    name = type(transformer).__name__
    if name not in known:
        raise UnsupportedLayoutError(
            f"{name} is not a DiT family ditf supports; supported transformer classes: {', '.join(sorted(known))}."
        )
    return known[name](transformer, vae)
