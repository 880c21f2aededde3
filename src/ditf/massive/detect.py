"""Which channels are massive, and how those channel sets compare.

Three detection rules, each returning sorted channel indices:
- ratio (DiTF style): median |x| over tokens >= `threshold` x the median over channels of that value;
- Sun et al. 2024: some entry has |x| > `abs_threshold` and |x| >= `rel_threshold` x the median |x|
  of the whole hidden state;
- top-k (Turri et al. 2026): the k channels with the largest statistic (|mean x| by default; the
  paper's text is ambiguous between |mean x| and mean |x|, so both are offered).

Plus channel sets for controls (top-k, bottom-k, random-k, magnitude-matched), Jaccard stability of
sets across steps, blocks and runs, and the overlap of MA channels with the peaks of the AdaLN gate
and scale vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from ditf.channels import as_token_matrix, check_channels, ratio_channels
from ditf.errors import InvalidArgumentError
from ditf.massive.stats import Cell, ChannelStats, StatsTable, channel_stats

# ---------------------------------------------------------------------------------------------
# Channel sets


def _check_k(k: int, available: int, what: str) -> int:
    if not 0 <= int(k) <= available:
        raise InvalidArgumentError(
            f"k={k} {what} is impossible: only {available} channels are available. Pick k in [0, {available}]."
        )
    return int(k)


def _candidates(num_channels: int, exclude: Iterable[int]) -> torch.Tensor:
    excluded = check_channels(exclude, num_channels, name="exclude")
    keep = torch.ones(num_channels, dtype=torch.bool)
    keep[excluded] = False
    return keep.nonzero().flatten()


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise InvalidArgumentError(
            f"scores must be a non-empty (C,) tensor of per-channel values; got {shape}. "
            "Use e.g. channel_stats(x).statistic('mean_abs')."
        )
    return scores.detach().double()


def top_k_channels(scores: torch.Tensor, k: int, exclude: Iterable[int] = ()) -> list[int]:
    """The `k` channels with the largest `scores` (C,), as sorted indices; ties go to the lower index."""
    scores = _check_scores(scores)
    candidates = _candidates(scores.numel(), exclude)
    k = _check_k(k, candidates.numel(), "top channels")
    order = scores[candidates].argsort(descending=True, stable=True)
    return sorted(candidates[order[:k]].tolist())


def bottom_k_channels(scores: torch.Tensor, k: int, exclude: Iterable[int] = ()) -> list[int]:
    """The `k` channels with the smallest `scores` (C,), as sorted indices (the "low-statistic" control)."""
    scores = _check_scores(scores)
    candidates = _candidates(scores.numel(), exclude)
    k = _check_k(k, candidates.numel(), "bottom channels")
    order = scores[candidates].argsort(stable=True)
    return sorted(candidates[order[:k]].tolist())


def random_k_channels(num_channels: int, k: int, *, seed: int, exclude: Iterable[int] = ()) -> list[int]:
    """`k` channels drawn uniformly without replacement from [0, num_channels) minus `exclude`; seeded."""
    candidates = _candidates(int(num_channels), exclude)
    k = _check_k(k, candidates.numel(), "random channels")
    generator = torch.Generator().manual_seed(int(seed))
    picks = torch.randperm(candidates.numel(), generator=generator)[:k]
    return sorted(candidates[picks].tolist())


def magnitude_matched_channels(
    scores: torch.Tensor,
    reference: Sequence[int],
    *,
    seed: int = 0,
    pool: int = 1,
    exclude: Iterable[int] = (),
) -> list[int]:
    """A control set as large as `reference` whose `scores` match it as closely as possible.

    scores: (C,) non-negative per-channel magnitudes. Each reference channel, largest first, takes an
    unused channel outside `reference` and `exclude` with the nearest log-score; with `pool` > 1 it
    picks at random (seeded) among the `pool` nearest. Massive channels are outliers by definition,
    so the match is the best available, not equal: compare `scores[control].sum()` with
    `scores[reference].sum()` to report the residual gap.
    """
    scores = _check_scores(scores)
    reference = check_channels(reference, scores.numel(), name="reference")
    if int(pool) < 1:
        raise InvalidArgumentError(f"pool={pool} must be >= 1 (1 picks the nearest channel).")
    available = _candidates(scores.numel(), [*reference, *set(exclude) - set(reference)]).tolist()
    if len(available) < len(reference):
        raise InvalidArgumentError(
            f"cannot match {len(reference)} reference channels: only {len(available)} channels remain "
            "after excluding the reference and `exclude`. Use a smaller reference set."
        )
    log_scores = scores.abs().clamp_min(torch.finfo(torch.float64).tiny).log()
    generator = torch.Generator().manual_seed(int(seed))
    chosen: list[int] = []
    for channel in sorted(reference, key=lambda c: (-scores[c].item(), c)):
        pool_size = min(int(pool), len(available))
        distance = (log_scores[available] - log_scores[channel]).abs()
        nearest = distance.argsort(stable=True)[:pool_size]
        pick = nearest[torch.randint(pool_size, (1,), generator=generator).item()].item()
        chosen.append(available.pop(pick))
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Detection rules


def _as_stats(data: ChannelStats | torch.Tensor) -> ChannelStats:
    return data if isinstance(data, ChannelStats) else channel_stats(data)


def detect_ratio(data: ChannelStats | torch.Tensor, threshold: float = 100.0) -> list[int]:
    """Channels whose median |x| over tokens is >= `threshold` x the median over channels of it.

    data: `ChannelStats` or activations (B, N, C) / (N, C). The test is multiplicative,
    median_abs[c] >= threshold * median(median_abs), and channels with median_abs == 0 never pass.
    """
    return ratio_channels(_as_stats(data).median_abs, threshold)


def detect_sun(
    data: ChannelStats | torch.Tensor, abs_threshold: float = 100.0, rel_threshold: float = 1000.0
) -> list[int]:
    """Channels holding an entry with |x| > `abs_threshold` and |x| >= `rel_threshold` x median |x|.

    The median is over every entry of the hidden state (`ChannelStats.median_all`); a channel passes
    when its max |x| passes both tests (Sun et al. 2024, sec. 2).
    """
    if abs_threshold < 0 or rel_threshold < 0:
        raise InvalidArgumentError(
            f"abs_threshold={abs_threshold} and rel_threshold={rel_threshold} must be >= 0 (Sun et al.: 100 and 1000)."
        )
    stats = _as_stats(data)
    massive = (stats.max_abs > abs_threshold) & (stats.max_abs >= rel_threshold * stats.median_all)
    return massive.nonzero().flatten().tolist()


def sun_massive_entries(x: torch.Tensor, abs_threshold: float = 100.0, rel_threshold: float = 1000.0) -> torch.Tensor:
    """Entries of activations x (N, C) or (B, N, C) that pass Sun et al.'s test.

    Returns an int64 tensor (M, x.ndim) of indices ([token, channel] or [batch, token, channel]);
    the median is taken over all entries of x.
    """
    as_token_matrix(x)
    magnitude = x.detach().float().abs()
    median = magnitude.flatten().median()
    return ((magnitude > abs_threshold) & (magnitude >= rel_threshold * median)).nonzero()


def detect_top_k(data: ChannelStats | torch.Tensor, k: int, statistic: str = "abs_mean") -> list[int]:
    """Turri et al.'s rule: the `k` channels with the largest `statistic` (default |mean x| over tokens)."""
    return top_k_channels(_as_stats(data).statistic(statistic), k)


class DetectionRule(Protocol):
    """A named rule with its parameters that maps `ChannelStats` to sorted massive-channel indices."""

    name: ClassVar[str]

    def detect(self, stats: ChannelStats) -> list[int]:
        """Sorted indices of the channels the rule flags."""
        ...

    def describe(self) -> dict[str, Any]:
        """The rule's name and parameters, JSON-able (for reports and manifests)."""
        ...


@dataclass(frozen=True)
class RatioRule:
    """`detect_ratio` with its threshold, for tables and reports."""

    threshold: float = 100.0
    name: ClassVar[str] = "ratio"

    def detect(self, stats: ChannelStats) -> list[int]:
        """Sorted channels passing the ratio rule."""
        return detect_ratio(stats, self.threshold)

    def describe(self) -> dict[str, Any]:
        """The rule's name and parameters, JSON-able."""
        return {"rule": self.name, **asdict(self)}


@dataclass(frozen=True)
class SunRule:
    """`detect_sun` with its thresholds, for tables and reports."""

    abs_threshold: float = 100.0
    rel_threshold: float = 1000.0
    name: ClassVar[str] = "sun"

    def detect(self, stats: ChannelStats) -> list[int]:
        """Sorted channels passing Sun et al.'s criterion."""
        return detect_sun(stats, self.abs_threshold, self.rel_threshold)

    def describe(self) -> dict[str, Any]:
        """The rule's name and parameters, JSON-able."""
        return {"rule": self.name, **asdict(self)}


@dataclass(frozen=True)
class TopKRule:
    """`detect_top_k` with its k and statistic. k has no default: the papers leave it open."""

    k: int
    statistic: str = "abs_mean"
    name: ClassVar[str] = "top_k"

    def detect(self, stats: ChannelStats) -> list[int]:
        """Sorted top-k channels by the rule's statistic."""
        return detect_top_k(stats, self.k, self.statistic)

    def describe(self) -> dict[str, Any]:
        """The rule's name and parameters, JSON-able."""
        return {"rule": self.name, **asdict(self)}


Detections = dict[Cell, list[int]]
"""Sorted massive channels per (block, step)."""


def detect_table(table: StatsTable, rule: DetectionRule) -> Detections:
    """Apply `rule` to every (block, step) of `table`."""
    return {cell: rule.detect(stats) for cell, stats in table.items()}


# ---------------------------------------------------------------------------------------------
# Stability of channel sets


def jaccard(first: Iterable[int], second: Iterable[int]) -> float | None:
    """|A ∩ B| / |A ∪ B| of two channel sets; None (undefined, a missing value) when both are empty."""
    a, b = set(first), set(second)
    union = a | b
    return None if not union else len(a & b) / len(union)


def jaccard_matrix(sets: Sequence[Iterable[int]]) -> torch.Tensor:
    """Pairwise Jaccard indices of channel sets, shape (n, n), float64; NaN where both sets are empty (undefined,
    the diagonal of an empty set included), else 1 on the diagonal."""
    frozen = [set(s) for s in sets]
    n = len(frozen)
    matrix = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            value = jaccard(frozen[i], frozen[j])
            matrix[i, j] = matrix[j, i] = float("nan") if value is None else value
    return matrix


def off_diagonal_values(matrix: torch.Tensor) -> torch.Tensor:
    """The defined (non-NaN) off-diagonal entries of a Jaccard matrix (n, n), as a 1-D tensor."""
    n = matrix.shape[0]
    values = matrix[~torch.eye(n, dtype=torch.bool)]
    return values[~values.isnan()]


def mean_pairwise_jaccard(matrix: torch.Tensor) -> float | None:
    """Mean of the defined off-diagonal entries of a Jaccard matrix (n, n); None when there is none (n < 2, or
    every pair of sets is empty)."""
    values = off_diagonal_values(matrix)
    return float(values.mean()) if values.numel() else None


class Stability(NamedTuple):
    """Jaccard matrix of the sets found at `labels` (steps, blocks or runs); NaN where undefined (two empty sets)."""

    labels: list[Any]
    matrix: torch.Tensor  # (n, n) float64


def jaccard_across_steps(detections: Detections, block: int) -> Stability:
    """How stable the set at `block` is across steps: Jaccard over that block's recorded steps."""
    steps = sorted(step for b, step in detections if b == block)
    if not steps:
        raise InvalidArgumentError(f"block {block} has no detections; blocks present: {_present(detections, 0)}.")
    return Stability(steps, jaccard_matrix([detections[(block, step)] for step in steps]))


def jaccard_across_blocks(detections: Detections, step: int) -> Stability:
    """How stable the set at `step` is across blocks: Jaccard over the blocks recorded at that step."""
    blocks = sorted(b for b, s in detections if s == step)
    if not blocks:
        raise InvalidArgumentError(f"step {step} has no detections; steps present: {_present(detections, 1)}.")
    return Stability(blocks, jaccard_matrix([detections[(block, step)] for block in blocks]))


def jaccard_across_runs(runs: Mapping[str, Detections], block: int, step: int) -> Stability:
    """How stable the set at (block, step) is across runs (prompts or seeds), keyed by run label."""
    missing = [label for label, detections in runs.items() if (block, step) not in detections]
    if missing:
        raise InvalidArgumentError(
            f"runs {missing} have no detections at block {block}, step {step}; record the same blocks and "
            "steps in every run."
        )
    labels = list(runs)
    return Stability(labels, jaccard_matrix([runs[label][(block, step)] for label in labels]))


def _present(detections: Detections, axis: int) -> list[int]:
    return sorted({cell[axis] for cell in detections})


# ---------------------------------------------------------------------------------------------
# AdaLN alignment


@dataclass(frozen=True)
class AdalnAlignment:
    """Overlap between MA channels and the largest-|value| channels of a block's AdaLN vectors.

    recall = |MA ∩ peaks| / |MA|: the share of MA channels that are gate (or scale) peaks.
    """

    ma_channels: list[int]
    gate_peaks: list[int]
    gate_jaccard: float | None
    gate_recall: float
    scale_peaks: list[int] | None = None
    scale_jaccard: float | None = None
    scale_recall: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return asdict(self)


def _as_channel_vector(vector: torch.Tensor, name: str, num_channels: int | None) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor of shape (C,); got {type(vector).__name__}.")
    flat = vector.detach().reshape(-1) if vector.ndim == 2 and vector.shape[0] == 1 else vector.detach()
    if flat.ndim != 1 or (num_channels is not None and flat.numel() != num_channels):
        raise InvalidArgumentError(
            f"{name} has shape {tuple(vector.shape)}; expected ({num_channels or 'C'},) or (1, C) per-channel "
            "values of one block and step. Pick one sample (vector[i]) from a batched modulation."
        )
    return flat.double()


def adaln_alignment(
    ma_channels: Sequence[int],
    gate: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    k: int | None = None,
) -> AdalnAlignment:
    """Compare MA channels with the top-`k` |gate| (alpha) and |scale| (gamma) channels of a block.

    gate, scale: (C,) or (1, C) AdaLN modulation vectors. k defaults to the number of MA channels.
    """
    gate_vector = _as_channel_vector(gate, "gate", None)
    num_channels = gate_vector.numel()
    channels = check_channels(ma_channels, num_channels, name="ma_channels")
    if not channels and k is None:
        raise InvalidArgumentError(
            "ma_channels is empty, so alignment is undefined; detect MA channels first (or pass k to "
            "list the gate peaks anyway)."
        )
    k = len(channels) if k is None else _check_k(k, num_channels, "peaks")

    def overlap(peaks: list[int]) -> tuple[float | None, float]:
        recall = len(set(peaks) & set(channels)) / len(channels) if channels else 0.0
        return jaccard(peaks, channels), recall

    gate_peaks = top_k_channels(gate_vector.abs(), k)
    gate_jaccard, gate_recall = overlap(gate_peaks)
    if scale is None:
        return AdalnAlignment(channels, gate_peaks, gate_jaccard, gate_recall)
    scale_peaks = top_k_channels(_as_channel_vector(scale, "scale", num_channels).abs(), k)
    scale_jaccard, scale_recall = overlap(scale_peaks)
    return AdalnAlignment(channels, gate_peaks, gate_jaccard, gate_recall, scale_peaks, scale_jaccard, scale_recall)
