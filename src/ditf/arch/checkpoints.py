"""Where a diffusers tensor lies in a checkpoint of another layout: what family adapters describe their
original single-file layouts with (`ArchSpec.original_key_map`), and what `ditf.single_file` reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSource:
    """Where one diffusers tensor lies in a checkpoint: rows [start, stop) of tensor `key` along dim 0
    (the whole tensor when both are None), with its two halves along dim 0 swapped when `swap_halves`."""

    key: str
    start: int | None = None
    stop: int | None = None
    swap_halves: bool = False

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        """Shape of the result, given the shape `stored` of the checkpoint tensor `key`."""
        if self.start is None:
            return tuple(stored)
        return (self.stop - self.start, *stored[1:])

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The result, from the whole checkpoint tensor (already in memory)."""
        if self.start is not None:
            tensor = tensor[self.start:self.stop]
        return _swap_halves(tensor) if self.swap_halves else tensor.contiguous()

    def read(self, handle: Any, prefix: str = "") -> torch.Tensor:
        """The result, reading only its rows from an open `safetensors.safe_open` handle."""
        if self.start is None:
            tensor = handle.get_tensor(prefix + self.key)
        else:
            tensor = handle.get_slice(prefix + self.key)[self.start:self.stop]
        return _swap_halves(tensor) if self.swap_halves else tensor


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
