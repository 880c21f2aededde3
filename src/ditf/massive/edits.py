"""Edits: change chosen channels of chosen tokens with an operation, at chosen blocks, steps and branches.

An `Op` says what the selected entries become (zero, a mean, a constant, a scaled or clamped value); an
`Edit` says where (blocks, steps, branch, tokens, channels). Selected entries take the op's values; all
others keep their exact bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.massive.actions import BlockCall, ScopedAction
from ditf.massive.channels import ChannelSpec, parse_channels
from ditf.massive.scopes import BlockSpec, StepSpec, TokenSpec, check_tokens, describe_tokens, token_mask


class Op(ABC):
    """How selected entries change: values(x, mask, t) gives the new values of x (B, N, C) where mask (N, C) is True."""

    @abstractmethod
    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        """New values for x (B, N, C); only entries under `mask` (N, C) are used."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The operation and its parameters, JSON-able."""


class ZeroOp(Op):
    """Set to 0."""

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return torch.zeros_like(x)

    def describe(self) -> dict[str, Any]:
        return {"op": "zero"}


@dataclass(frozen=True)
class MeanOp(Op):
    """Set to the channel's mean over the selected tokens of each sample (Sun et al.'s `set_mean`),
    or to fixed per-channel `means` (C,) (e.g. `ChannelStats.mean` from a calibration recording)."""

    means: torch.Tensor | None = None

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        if self.means is not None:
            if self.means.shape != (x.shape[-1],):
                raise InvalidArgumentError(
                    f"means has shape {tuple(self.means.shape)}; this stream has C={x.shape[-1]} channels: pass (C,)."
                )
            return self.means.to(x.device, torch.float32).expand(x.shape)
        weights = mask.float()
        count = weights.sum(dim=0).clamp_min(1.0)
        mean = (x.float() * weights).sum(dim=1, keepdim=True) / count
        return mean.expand(x.shape)

    def describe(self) -> dict[str, Any]:
        return {"op": "mean", "source": "tokens" if self.means is None else "given"}


@dataclass(frozen=True)
class ConstantOp(Op):
    """Set to a constant `value`."""

    value: float

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return torch.full_like(x, float(self.value))

    def describe(self) -> dict[str, Any]:
        return {"op": "constant", "value": float(self.value)}


@dataclass(frozen=True)
class ScaleOp(Op):
    """Multiply by rho: a number, or a function of the timestep t (0..1000, see `CallState.t`)."""

    rho: float | Callable[[float | None], float]

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        rho = self.rho(t) if callable(self.rho) else self.rho
        if not isinstance(rho, (int, float)) or not math.isfinite(rho):
            raise InvalidArgumentError(f"rho(t={t}) returned {rho!r}; it must return a finite number.")
        return x * rho

    def describe(self) -> dict[str, Any]:
        if callable(self.rho):
            return {"op": "scale", "rho": getattr(self.rho, "__name__", repr(self.rho))}
        return {"op": "scale", "rho": float(self.rho)}


@dataclass(frozen=True)
class ClampOp(Op):
    """Clamp to [low, high] (either may be None); `ClampOp(-50, 50)` caps magnitudes at 50."""

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise InvalidArgumentError("clamp needs low, high or both; e.g. ClampOp(-50, 50) caps |x| at 50.")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise InvalidArgumentError(f"clamp low={self.low} is above high={self.high}; swap them.")

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return x.clamp(min=self.low, max=self.high)

    def describe(self) -> dict[str, Any]:
        return {"op": "clamp", "low": self.low, "high": self.high}


def parse_op(text: str) -> Op:
    """'zero' | 'mean' | 'const:V' | 'scale:R' | 'clamp:V' (|x| <= V) -> an `Op`."""
    name, _, argument = text.strip().partition(":")
    try:
        if name == "zero" and not argument:
            return ZeroOp()
        if name == "mean" and not argument:
            return MeanOp()
        if name == "const" and argument:
            return ConstantOp(float(argument))
        if name == "scale" and argument:
            return ScaleOp(float(argument))
        if name == "clamp" and argument:
            limit = abs(float(argument))
            return ClampOp(-limit, limit)
    except ValueError as err:
        raise InvalidArgumentError(f"op={text!r}: the part after ':' must be a number.") from err
    raise InvalidArgumentError(f"op={text!r} is not an operation; use zero, mean, const:V, scale:R or clamp:V.")


def entry_mask(num_tokens: int, num_channels: int, tokens: torch.Tensor | None, channels: Sequence[int],
               device: torch.device) -> torch.Tensor:
    """(N, C) bool mask: True at the chosen tokens (None = all) x chosen channels."""
    channel_mask = torch.zeros(num_channels, dtype=torch.bool, device=device)
    channel_mask[list(channels)] = True
    token_part = torch.ones(num_tokens, dtype=torch.bool, device=device) if tokens is None else tokens.to(device)
    return token_part[:, None] & channel_mask[None, :]


class Edit(ScopedAction):
    """Change chosen channels of chosen tokens at chosen blocks, steps and branches with an `Op`.

    channels: a selector or spec (`parse_channels`), resolved per block call on that call's own
    activations (so 'auto' finds each block's massive channels); tokens: 'image', 'text', or a bool
    (h, w) mask of image tokens. Selected entries take the op's values; all others keep their exact bits.
    """

    def __init__(self, op: Op, channels: ChannelSpec = "auto", *, blocks: BlockSpec = "all", steps: StepSpec = "all",
                 tokens: TokenSpec = "image", branch: str | Iterable[str] = "all"):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        self.op = op
        self.channels = parse_channels(channels)
        self.tokens = check_tokens(tokens)

    def on_block_input(self, call: BlockCall) -> None:
        stream = "text" if self.tokens == "text" else "image"
        for branch, rows in call.state.rows_in(self.branches):
            x = call.stream(stream)[rows]
            channels = self.channels.select(x)
            selected_tokens = token_mask(self.tokens, x.shape[1]) if stream == "image" else None
            entry = {"block": call.block.index, "step": call.state.step, "branch": branch, "channels": channels,
                     "tokens": x.shape[1] if selected_tokens is None else int(selected_tokens.sum())}
            self.mark(call.state, entry)
            if not channels or entry["tokens"] == 0:
                continue
            mask = entry_mask(x.shape[1], x.shape[2], selected_tokens, channels, x.device)
            new = self.op.values(x, mask, call.state.t).to(x.dtype)
            call.write(stream, rows, torch.where(mask, new, x))

    def describe(self) -> dict[str, Any]:
        return {"action": type(self).__name__, **self.op.describe(), "channels": self.channels.describe(),
                "tokens": describe_tokens(self.tokens), **self.scope(), "applied": self.applied, "log": self.log}


class Zero(Edit):
    """Set the channels to 0 (Turri et al.'s disruption probe; DiTF's channel discard)."""

    def __init__(self, channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ZeroOp(), channels, **scope)


class SetMean(Edit):
    """Set the channels to their mean over the selected tokens (or to given `means` (C,))."""

    def __init__(self, channels: ChannelSpec = "auto", *, means: torch.Tensor | None = None, **scope: Any):
        super().__init__(MeanOp(means), channels, **scope)


class SetConstant(Edit):
    """Set the channels to a constant."""

    def __init__(self, value: float, channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ConstantOp(value), channels, **scope)


class Scale(Edit):
    """Multiply the channels by rho, a number or a function of t (e.g. DG's retention schedule rho_t)."""

    def __init__(self, rho: float | Callable[[float | None], float], channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ScaleOp(rho), channels, **scope)


class Clamp(Edit):
    """Clamp the channels to [low, high]."""

    def __init__(self, low: float | None = None, high: float | None = None, channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ClampOp(low, high), channels, **scope)


__all__ = [
    "Clamp", "ClampOp", "ConstantOp", "Edit", "MeanOp", "Op", "Scale", "ScaleOp", "SetConstant", "SetMean", "Zero",
    "ZeroOp", "entry_mask", "parse_op",
]
