"""Edits: change chosen channels of chosen tokens with an operation, at chosen blocks, steps and branches.

An `Op` says what the selected entries become (zero, a fixed mean, a constant, a scaled or clamped value); an
`Edit` says where (blocks, steps, branch, tokens, channels). Selected entries take the op's values; all
others keep their exact bits.

Channels that are detected ('auto', 'top:K', ...) and their controls ('bottom', 'random', 'matched') are chosen
from the statistics of the unmodified stream: the `reference` of the edit, a clean pass of the same prompt and
seed (`ditf.massive.reference.record_reference`; `generate` runs it for you). Detecting on the stream being edited
would find nothing below the first edited block, so a disruption and its control would cover different calls.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ditf.errors import InvalidArgumentError
from ditf.massive.actions import BlockCall, ScopedAction
from ditf.massive.channels import ChannelSpec, parse_channels
from ditf.massive.record import Recording
from ditf.massive.scopes import BlockSpec, StepSpec, TokenSpec, check_tokens, describe_tokens, token_mask
from ditf.massive.stats import ChannelStats, StatsTable, channel_stats

if TYPE_CHECKING:
    from ditf.massive.session import Session

REFERENCE_BRANCH = {"detail": "cond", "extra": "cond"}
"""Edit branch -> reference branch read for it: extra predictions of a step are variants of the conditional one."""

Reference = Recording | StatsTable | Literal["live"] | None
"""Where an edit's detected channels come from: a clean-pass `Recording` (statistics per block, step and branch),
a `StatsTable` (one branch), 'live' (the stream as it arrives at the block, changed by any upstream edit), or None
(not chosen yet; required only for detected channels and controls)."""


@dataclass(frozen=True)
class Where:
    """The block call an op changes: global block index, denoising step and timestep t (0..1000, see `CallState.t`)."""

    block: int
    step: int
    t: float | None = None


class Op(ABC):
    """How selected entries change: values(x, mask, where) gives the new values of x (B, N, C) where mask (N, C) is True."""

    @abstractmethod
    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        """New values for x (B, N, C) at block call `where`; only entries under `mask` (N, C) are used."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The operation and its parameters, JSON-able."""

    def check(self, num_channels: int | None) -> None:
        """Refuse parameters that do not fit a model with `num_channels` channels (None: unknown), before sampling."""


class ZeroOp(Op):
    """Set to 0."""

    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        return torch.zeros_like(x)

    def describe(self) -> dict[str, Any]:
        return {"op": "zero"}


@dataclass(frozen=True, eq=False)
class MeanOp(Op):
    """Set each channel to a fixed value measured across inputs (Sun et al.'s `set_mean`): its mean x over the
    prompts and tokens of a recording, not over the tokens of the sample being changed (a massive channel is
    nearly constant over tokens, so that per-sample mean changes almost nothing).

    means: a `StatsTable` of the same hook point (its `ChannelStats.mean` at the block and step of each call;
    merge tables of several prompts with `merge_stats_tables`, or load a scan's with `load_stats_table`), or one
    (C,) tensor used at every block and step.
    """

    means: StatsTable | torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.means, torch.Tensor):
            if self.means.ndim != 1 or not bool(torch.isfinite(self.means).all()):
                raise InvalidArgumentError(f"means has shape {tuple(self.means.shape)}; pass finite per-channel means (C,).")
        elif not isinstance(self.means, StatsTable) or len(self.means) == 0:
            raise InvalidArgumentError(
                "means must be a non-empty StatsTable (e.g. load_stats_table('<scan>/stats.json')) or a (C,) tensor "
                f"of per-channel means; got {type(self.means).__name__}."
            )

    def check(self, num_channels: int | None) -> None:
        width = self.means.shape[0] if isinstance(self.means, torch.Tensor) else self.means.num_channels
        if num_channels is not None and width != num_channels:
            raise InvalidArgumentError(
                f"the means have C={width} channels but this model's stream has C={num_channels}; measure them on "
                "the same model (ditf massive scan --model ...)."
            )

    def mean_at(self, block: int, step: int) -> torch.Tensor:
        """The (C,) means used at `block`, `step`."""
        if isinstance(self.means, torch.Tensor):
            return self.means
        if (block, step) not in self.means:
            raise InvalidArgumentError(
                f"the means table has no statistics at block {block}, step {step} (it has blocks "
                f"{self.means.blocks} and steps {self.means.steps}); record it over the blocks and the number of "
                "steps you edit."
            )
        return self.means[(block, step)].mean

    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        means = self.mean_at(where.block, where.step)
        if means.shape != (x.shape[-1],):
            raise InvalidArgumentError(
                f"means has shape {tuple(means.shape)}; this stream has C={x.shape[-1]} channels: pass (C,)."
            )
        return means.to(x.device, torch.float32).expand(x.shape)

    def describe(self) -> dict[str, Any]:
        if isinstance(self.means, torch.Tensor):
            return {"op": "mean", "means": "given (C,) values"}
        meta = self.means.meta
        keep = ("model", "prompt", "prompts", "seed", "branch", "point", "source")
        return {"op": "mean", "means": {"table": {key: meta[key] for key in keep if key in meta},
                                        "blocks": self.means.blocks, "steps": self.means.steps}}


@dataclass(frozen=True)
class ConstantOp(Op):
    """Set to a constant `value`."""

    value: float

    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        return torch.full_like(x, float(self.value))

    def describe(self) -> dict[str, Any]:
        return {"op": "constant", "value": float(self.value)}


@dataclass(frozen=True)
class ScaleOp(Op):
    """Multiply by rho: a number, or a function of the timestep t (0..1000, see `CallState.t`)."""

    rho: float | Callable[[float | None], float]

    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        rho = self.rho(where.t) if callable(self.rho) else self.rho
        if not isinstance(rho, (int, float)) or not math.isfinite(rho):
            raise InvalidArgumentError(f"rho(t={where.t}) returned {rho!r}; it must return a finite number.")
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

    def values(self, x: torch.Tensor, mask: torch.Tensor, where: Where) -> torch.Tensor:
        return x.clamp(min=self.low, max=self.high)

    def describe(self) -> dict[str, Any]:
        return {"op": "clamp", "low": self.low, "high": self.high}


def parse_op(text: str, *, means: StatsTable | torch.Tensor | None = None) -> Op:
    """'zero' | 'mean' | 'const:V' | 'scale:R' | 'clamp:V' (|x| <= V) -> an `Op`; 'mean' needs `means` (see `MeanOp`)."""
    name, _, argument = text.strip().partition(":")
    if name == "mean" and not argument:
        if means is None:
            raise InvalidArgumentError(
                "op 'mean' sets channels to their mean measured across inputs (Sun et al.), so it needs those "
                "means: pass means= (a StatsTable, e.g. load_stats_table('<scan>/stats.json')); on the command "
                "line, --mean-from <scan folder>."
            )
        return MeanOp(means)
    try:
        if name == "zero" and not argument:
            return ZeroOp()
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

    channels: a selector or spec (`parse_channels`). Fixed channels are used as given. Detected channels
    ('auto', 'sun', 'top:K') and controls ('bottom', 'random', 'matched') are picked per block, step and branch
    from `reference`: a clean-pass `Recording` of the same prompt and seed (`record_reference`), a `StatsTable`,
    or 'live' (the stream as it arrives, changed by upstream edits: only right for a single block whose
    upstream nothing edits, as in Detail Guidance). tokens: 'image', 'text', or a bool (h, w) mask of image
    tokens. Selected entries take the op's values; all others keep their exact bits.

    `applied` counts the block calls in scope, `edited` those where at least one entry changed.
    """

    def __init__(self, op: Op, channels: ChannelSpec = "auto", *, blocks: BlockSpec = "all", steps: StepSpec = "all",
                 tokens: TokenSpec = "image", branch: str | Iterable[str] = "all", reference: Reference = None):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        if not isinstance(op, Op):
            raise InvalidArgumentError(f"op must be an Op (ZeroOp(), ScaleOp(0.5), parse_op('zero'), ...); got {op!r}.")
        self.op = op
        self.channels = parse_channels(channels)
        self.tokens = check_tokens(tokens)
        self.reference: Reference = None
        self.edited = 0
        self.use_reference(reference)

    # -------------------------------------------------------------- reference
    def needs_reference(self) -> bool:
        """True while the channels need statistics of the unmodified stream that were not given yet."""
        return self.channels.needs_statistics and self.reference is None

    def use_reference(self, reference: Reference) -> None:
        """Pick detected channels and controls from `reference` (see `Reference`)."""
        if not (reference is None or reference == "live" or isinstance(reference, (Recording, StatsTable))):
            raise InvalidArgumentError(
                f"reference={reference!r}; pass a Recording of a clean pass (record_reference), a StatsTable or 'live'."
            )
        self.reference = reference

    def bind(self, session: Session) -> None:
        super().bind(session)
        if self.needs_reference():
            raise InvalidArgumentError(
                f"{type(self).__name__}(channels={self.channels.describe()}) picks its channels from the unmodified "
                "stream, so it needs reference=: a Recording of a clean pass of the same prompt and seed "
                "(ditf.massive.reference.record_reference(pipe, prompt, blocks=...); ditf.massive.generate.generate "
                "runs it for you), or reference='live' to detect on the stream as it arrives (changed by upstream edits)."
            )
        width = session.arch.width
        self.op.check(width)
        if width is not None and not self.channels.needs_statistics:
            self.channels.select(width)

    def _reference_stats(self, block: int, step: int, branch: str) -> ChannelStats:
        reference_branch = REFERENCE_BRANCH.get(branch, branch)
        reference = self.reference
        table = reference.table("image", reference_branch) if isinstance(reference, Recording) else reference
        if (block, step) not in table:
            raise InvalidArgumentError(
                f"the reference has no statistics at block {block}, step {step}, branch {reference_branch!r} (it has "
                f"blocks {table.blocks}, steps {table.steps}); record the clean pass over the blocks, steps and "
                "branches the edit covers, with the same number of steps."
            )
        return table[(block, step)]

    # -------------------------------------------------------------- editing
    def on_block_input(self, call: BlockCall) -> None:
        stream = "text" if self.tokens == "text" else "image"
        block, step = call.block.index, call.state.step
        for branch, rows in call.state.rows_in(self.branches):
            x = call.stream(stream)[rows]
            stats = None
            if self.channels.needs_statistics:
                stats = channel_stats(x) if self.reference == "live" else self._reference_stats(block, step, branch)
            channels = self.channels.select(x.shape[-1], stats)
            selected_tokens = token_mask(self.tokens, x.shape[1]) if stream == "image" else None
            entry = {"block": block, "step": step, "branch": branch, "channels": channels,
                     "tokens": x.shape[1] if selected_tokens is None else int(selected_tokens.sum())}
            self.mark(call.state, entry)
            if not channels or entry["tokens"] == 0:
                continue
            self.edited += 1
            mask = entry_mask(x.shape[1], x.shape[2], selected_tokens, channels, x.device)
            new = self.op.values(x, mask, Where(block, step, call.state.t)).to(x.dtype)
            call.write(stream, rows, torch.where(mask, new, x))

    def describe(self) -> dict[str, Any]:
        return {"action": type(self).__name__, **self.op.describe(), "channels": self.channels.describe(),
                "reference": _describe_reference(self.reference, self.channels.needs_statistics),
                "tokens": describe_tokens(self.tokens), **self.scope(), "applied": self.applied,
                "edited": self.edited, "log": self.log}


def _describe_reference(reference: Reference, used: bool) -> Any:
    if not used:
        return None
    if reference == "live":
        return "live"
    meta = reference.meta if isinstance(reference, (Recording, StatsTable)) else {}
    return {"kind": "clean pass", **{key: meta[key] for key in ("prompt", "seed", "blocks", "steps") if key in meta}}


class Zero(Edit):
    """Set the channels to 0 (Turri et al.'s disruption probe; DiTF's channel discard)."""

    def __init__(self, channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ZeroOp(), channels, **scope)


class SetMean(Edit):
    """Set the channels to fixed means measured across inputs (`MeanOp`; Sun et al.'s `set_mean`)."""

    def __init__(self, channels: ChannelSpec = "auto", *, means: StatsTable | torch.Tensor, **scope: Any):
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
    "Clamp", "ClampOp", "ConstantOp", "Edit", "MeanOp", "Op", "Reference", "Scale", "ScaleOp", "SetConstant",
    "SetMean", "Where", "Zero", "ZeroOp", "entry_mask", "parse_op",
]
