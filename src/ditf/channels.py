"""Channel indices and the massive-channel rule, shared by DiTF's channel discard and the massive-activation tools.

A leaf module (torch only): `ditf.features` uses it for `discard="auto"`, `ditf.massive` for its ratio rule.
Activations are (B, N, C) or (N, C): N tokens, C channels; batch rows count as more tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ditf.errors import InvalidArgumentError

MASSIVE_RATIO = 100.0
"""Default ratio of the massive-channel rule: a channel is massive when its median |x| over tokens is at least
this many times the median over channels of that value (DiTF: massive activations are ~100x the rest)."""


def check_channels(channels: Iterable[int], num_channels: int, name: str = "channels") -> list[int]:
    """`channels` as a list of ints, in the given order, after checking each is an integer in [0, num_channels)
    and listed once."""
    channels = list(channels)
    not_integers = [c for c in channels if isinstance(c, bool) or not hasattr(c, "__index__")]
    if not_integers:
        raise InvalidArgumentError(f"{name} {not_integers} are not channel indices; pass integers like 154, 1446.")
    channel_list = [int(c) for c in channels]
    out_of_range = [c for c in channel_list if not 0 <= c < num_channels]
    if out_of_range:
        raise InvalidArgumentError(
            f"{name} {out_of_range} are out of range; valid channel indices are 0..{num_channels - 1} "
            f"(C={num_channels}). Check the model's hidden width."
        )
    if len(set(channel_list)) != len(channel_list):
        raise InvalidArgumentError(f"{name} {channel_list} contain duplicates; list each channel once.")
    return channel_list


def as_token_matrix(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Reshape activations (B, N, C) or (N, C) to a (B*N, C) fp32 matrix; raise on any other rank."""
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(
            f"{name} must be a torch.Tensor of shape (B, N, C) or (N, C); got {type(x).__name__}."
        )
    if x.ndim not in (2, 3) or x.shape[-1] == 0 or x.numel() == 0:
        raise InvalidArgumentError(
            f"{name} has shape {tuple(x.shape)}; expected (B, N, C) or (N, C) with N, C > 0 "
            "(tokens x channels). Slice off text tokens and flatten spatial grids to N = h*w first."
        )
    return x.detach().reshape(-1, x.shape[-1]).float()


def median_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-channel median of |x| over tokens: (B, N, C) or (N, C) -> (C,) fp32 (lower middle for even counts)."""
    return as_token_matrix(x).T.abs().contiguous().median(dim=1).values


def ratio_channels(median_abs_per_channel: torch.Tensor, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Sorted channels c with median_abs[c] >= ratio * median over channels of median_abs (and median_abs[c] > 0).

    `median_abs_per_channel` is (C,), e.g. `median_abs(x)`.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise InvalidArgumentError(f"massive ratio {ratio!r} must be a number > 0 (DiTF-style default {MASSIVE_RATIO:g}).")
    values = median_abs_per_channel.float()
    reference = values.median(dim=-1).values
    massive = (values >= ratio * reference) & (values > 0)
    return massive.nonzero().flatten().tolist()


def detect_massive_channels(x: torch.Tensor, ratio: float = MASSIVE_RATIO) -> list[int]:
    """The ratio rule on activations (B, N, C) or (N, C): sorted channels whose median |x| over tokens is at
    least `ratio` times the median over channels."""
    return ratio_channels(median_abs(x), ratio)
