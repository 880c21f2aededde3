"""Channel selectors: which channels of a block call's activations an action changes.

A selector picks channels from the per-channel statistics (`ChannelStats`) of one block, step and branch. Fixed
sets (`ExplicitChannels`, `AllChannels`) need only the width C. Detected sets and their controls
(`DetectedChannels`, `ControlChannels`) need statistics, and which statistics is the caller's choice: an `Edit`
reads them from a clean reference pass (the unmodified stream, see `ditf.massive.reference`), so the disruption and
its controls cover the same calls; Detail Guidance reads block m's input of its own clean forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ditf.channels import check_channels
from ditf.errors import InvalidArgumentError
from ditf.massive.detect import (
    DetectionRule,
    RatioRule,
    SunRule,
    TopKRule,
    bottom_k_channels,
    magnitude_matched_channels,
    random_k_channels,
)
from ditf.indices import parse_indices
from ditf.massive.stats import ChannelStats, channel_stats


class ChannelSelector(ABC):
    """Picks channels of a stream with C channels, from that stream's per-channel statistics when it needs them."""

    needs_statistics: ClassVar[bool] = False
    """True when `select` needs `ChannelStats` (detected sets and their controls); False for fixed sets."""

    @abstractmethod
    def select(self, num_channels: int, stats: ChannelStats | None = None) -> list[int]:
        """Sorted channel indices among C = `num_channels`, from `stats` (required when `needs_statistics`)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The selector's rule and parameters, JSON-able."""

    def select_in(self, x: torch.Tensor) -> list[int]:
        """Sorted channel indices for activations x (B, N, C), from the statistics of x itself."""
        return self.select(x.shape[-1], channel_stats(x) if self.needs_statistics else None)

    def _statistics(self, stats: ChannelStats | None, num_channels: int) -> ChannelStats:
        if stats is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} picks channels from statistics of the stream; pass the ChannelStats of the "
                "block call (e.g. from a clean reference pass)."
            )
        if stats.num_channels != num_channels:
            raise InvalidArgumentError(
                f"the statistics have C={stats.num_channels} channels but the stream has C={num_channels}; use "
                "statistics recorded at the same hook point of the same model."
            )
        return stats


@dataclass(frozen=True)
class ExplicitChannels(ChannelSelector):
    """A fixed list of channels (checked against the model's width C)."""

    channels: tuple[int, ...]

    def select(self, num_channels: int, stats: ChannelStats | None = None) -> list[int]:
        return sorted(check_channels(self.channels, num_channels))

    def describe(self) -> dict[str, Any]:
        return {"selector": "explicit", "channels": list(self.channels)}


@dataclass(frozen=True)
class DetectedChannels(ChannelSelector):
    """Massive channels found by a detection rule in the statistics of one block, step and branch.

    `rule` is a `ditf.massive.detect` rule; the default `RatioRule(100)` flags channels whose median
    |x| over tokens is >= 100x the median over channels (DiTF style); `TopKRule(k)` is Turri et al.'s.
    """

    rule: DetectionRule = field(default_factory=RatioRule)
    needs_statistics: ClassVar[bool] = True

    def select(self, num_channels: int, stats: ChannelStats | None = None) -> list[int]:
        return self.rule.detect(self._statistics(stats, num_channels))

    def describe(self) -> dict[str, Any]:
        return {"selector": "detected", **self.rule.describe()}


@dataclass(frozen=True)
class ControlChannels(ChannelSelector):
    """A control set for a comparison: `bottom`-k, `random`-k or `matched` (magnitude-matched) channels.

    Its size is `k`, or (k=None) the size of the set `like` selects from the same statistics, so each
    control is "an equally-sized set" (Turri et al.) and never overlaps it. `statistic` ranks channels for
    bottom-k and matching (mean |x| over tokens by default). `matched` picks, for every channel of `like`'s
    set, the unused channel with the nearest log-magnitude (the DG reviewers' magnitude-matched control;
    massive channels are outliers, so the match is the closest available, not equal).
    """

    kind: Literal["bottom", "random", "matched"]
    k: int | None = None
    like: ChannelSelector = field(default_factory=DetectedChannels)
    statistic: str = "mean_abs"
    seed: int = 0
    needs_statistics: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kind not in ("bottom", "random", "matched"):
            raise InvalidArgumentError(f"control kind={self.kind!r}; valid: 'bottom', 'random', 'matched'.")
        if self.kind == "matched" and self.k is not None:
            raise InvalidArgumentError("a magnitude-matched control takes its size from `like`; leave k=None.")

    def select(self, num_channels: int, stats: ChannelStats | None = None) -> list[int]:
        stats = self._statistics(stats, num_channels)
        reference = self.like.select(num_channels, stats)
        if self.kind == "matched":
            return magnitude_matched_channels(stats.statistic(self.statistic), reference, seed=self.seed)
        k = len(reference) if self.k is None else self.k
        if self.kind == "bottom":
            return bottom_k_channels(stats.statistic(self.statistic), k, exclude=reference)
        return random_k_channels(num_channels, k, seed=self.seed, exclude=reference)

    def describe(self) -> dict[str, Any]:
        return {"selector": self.kind, "k": self.k, "like": self.like.describe(), "statistic": self.statistic, "seed": self.seed}


@dataclass(frozen=True)
class AllChannels(ChannelSelector):
    """Every channel."""

    def select(self, num_channels: int, stats: ChannelStats | None = None) -> list[int]:
        return list(range(num_channels))

    def describe(self) -> dict[str, Any]:
        return {"selector": "all"}


ChannelSpec = ChannelSelector | str | Iterable[int]
"""A selector, a list of channel indices, or a string for `parse_channels`."""


def parse_channels(spec: ChannelSpec) -> ChannelSelector:
    """Turn a channel spec into a selector.

    Strings: 'auto' (ratio rule, threshold 100), 'sun' (Sun et al., |x| > 100 and >= 1000x median),
    'top:K' (Turri et al.'s top-k by |mean x|), 'bottom' / 'bottom:K', 'random' / 'random:K',
    'matched' (controls sized like 'auto'), 'all', or channel numbers '11,42'.
    """
    if isinstance(spec, ChannelSelector):
        return spec
    if not isinstance(spec, str):
        values = list(spec)
        if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in values):
            raise InvalidArgumentError(f"channels={values!r} must be integer channel indices.")
        return ExplicitChannels(tuple(int(v) for v in values))
    text = spec.strip()
    name, _, argument = text.partition(":")
    k = None
    if argument:
        try:
            k = int(argument)
        except ValueError as err:
            raise InvalidArgumentError(f"channels={spec!r}: the part after ':' must be a channel count k.") from err
    if name == "auto" and not argument:
        return DetectedChannels()
    if name == "sun" and not argument:
        return DetectedChannels(SunRule())
    if name == "all" and not argument:
        return AllChannels()
    if name == "top" and k is not None:
        return DetectedChannels(TopKRule(k))
    if name in ("bottom", "random"):
        return ControlChannels(name, k)
    if name == "matched" and not argument:
        return ControlChannels("matched")
    try:
        return ExplicitChannels(tuple(parse_indices(text, "channels")))
    except InvalidArgumentError as err:
        raise InvalidArgumentError(
            f"channels={spec!r} is not a channel spec; use 'auto', 'sun', 'top:K', 'bottom[:K]', 'random[:K]', "
            "'matched', 'all' or channel numbers such as '11,42'."
        ) from err


__all__ = [
    "AllChannels", "ChannelSelector", "ChannelSpec", "ControlChannels", "DetectedChannels", "ExplicitChannels",
    "parse_channels",
]
