"""Per-channel statistics of residual-stream activations, and a table of them per (block, step).

An activation tensor for one (block, step, branch) is `x` of shape (B, N, C) or (N, C): N image
tokens, C channels. Batch rows count as more tokens: statistics are taken over all B*N tokens.

Medians follow `torch.median`: for an even count they return the lower of the two middle values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ditf.channels import as_token_matrix, check_channels
from ditf.errors import InvalidArgumentError

STATISTICS: tuple[str, ...] = (
    "mean_abs",
    "abs_mean",
    "max_abs",
    "median_abs",
    "p999_abs",
    "ratio_to_median",
)
"""Names of the per-channel statistics (each a (C,) vector) that selectors and detectors accept."""

_STORED_VECTORS = ("mean_abs", "mean", "max_abs", "median_abs", "p999_abs")


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel statistics of |x| over the tokens of one or more forward calls.

    Vectors are fp32 of shape (C,); `median_all` is a scalar (median |x| over all tokens and channels).

    Exact for a single call. After `merge_channel_stats`, `mean_abs` and `mean` are exact
    token-weighted means and `max_abs` is the exact maximum; `median_abs`, `p999_abs` and
    `median_all` are token-weighted means of the per-call values (an approximation: a median is not
    mergeable without the data).
    """

    mean_abs: torch.Tensor
    mean: torch.Tensor
    max_abs: torch.Tensor
    median_abs: torch.Tensor
    p999_abs: torch.Tensor
    median_all: float
    n_tokens: int
    n_calls: int = 1

    @property
    def num_channels(self) -> int:
        """C, the number of channels."""
        return int(self.mean_abs.shape[0])

    @property
    def abs_mean(self) -> torch.Tensor:
        """|mean x| over tokens, shape (C,) (Turri et al.'s page formula)."""
        return self.mean.abs()

    @property
    def ratio_to_median(self) -> torch.Tensor:
        """median_abs / (median over channels of median_abs), shape (C,), dimensionless."""
        return self.median_abs / channel_median(self.median_abs).clamp_min(torch.finfo(torch.float32).tiny)

    def statistic(self, name: str) -> torch.Tensor:
        """Return the (C,) vector of statistic `name`, one of `STATISTICS`."""
        if name not in STATISTICS:
            raise InvalidArgumentError(
                f"statistic={name!r} is not a channel statistic; valid: {', '.join(STATISTICS)}. "
                "Pass one of these names."
            )
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists of floats) that `ChannelStats.from_dict` turns back into an equal object."""
        data: dict[str, Any] = {name: getattr(self, name).tolist() for name in _STORED_VECTORS}
        data.update(median_all=float(self.median_all), n_tokens=int(self.n_tokens), n_calls=int(self.n_calls))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelStats:
        """Rebuild from `to_dict` output; raises InvalidArgumentError naming a missing or ragged field."""
        missing = [key for key in (*_STORED_VECTORS, "median_all", "n_tokens") if key not in data]
        if missing:
            raise InvalidArgumentError(
                f"channel statistics dict lacks {missing}; it has {sorted(data)}. "
                "Pass a dict written by ChannelStats.to_dict()."
            )
        vectors = {name: torch.tensor(data[name], dtype=torch.float32) for name in _STORED_VECTORS}
        lengths = {name: tuple(vector.shape) for name, vector in vectors.items()}
        if len(set(lengths.values())) != 1 or vectors["mean_abs"].ndim != 1:
            raise InvalidArgumentError(
                f"channel statistics vectors must all have shape (C,); got {lengths}. "
                "The dict is corrupt: rewrite it with ChannelStats.to_dict()."
            )
        return cls(
            **vectors,
            median_all=float(data["median_all"]),
            n_tokens=int(data["n_tokens"]),
            n_calls=int(data.get("n_calls", 1)),
        )


def channel_median(values: torch.Tensor) -> torch.Tensor:
    """Median over the last dimension (lower middle for even counts), e.g. (C,) -> scalar tensor."""
    return values.median(dim=-1).values


class StatsWorkspace:
    """Two (C, N) fp32 matrices per shape and device, reused by `channel_stats` across calls.

    Without them every call allocates both matrices anew; on the CPU, the small results kept between those
    allocations fragment the heap, and memory grows by about a matrix per call while matrices are below glibc's
    mmap threshold (32 MB: e.g. FLUX width at 256 px). A recorder of many calls keeps one workspace.
    """

    def __init__(self) -> None:
        self._matrices: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, num_channels: int, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed, magnitude) buffers of shape (C, N), fp32, on `device`."""
        key = (num_channels, num_tokens, device)
        if key not in self._matrices:
            self._matrices[key] = tuple(torch.empty(num_channels, num_tokens, device=device) for _ in range(2))
        return self._matrices[key]


def channel_stats(x: torch.Tensor, workspace: StatsWorkspace | None = None) -> ChannelStats:
    """Exact per-channel statistics of one forward's activations.

    x: (B, N, C) or (N, C) activations (any float dtype; computed in fp32). Returns `ChannelStats`
    with (C,) vectors: mean|x|, mean x, max|x|, median|x| and the 99.9th percentile of |x| over the
    B*N tokens (nearest rank: the ceil(0.999*n)-th smallest), plus the median of |x| over
    every entry. workspace: buffers to reuse across many calls (see `StatsWorkspace`).
    """
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or x.numel() == 0:
        as_token_matrix(x)  # raises with the expected shapes
    rows = x.detach().reshape(-1, x.shape[-1]).T  # (C, N): order statistics run faster along contiguous rows
    if workspace is None:
        signed = rows.contiguous().float()  # transposing before the fp32 conversion moves half the bytes of bf16
        magnitude = signed.abs()
    else:
        signed, magnitude = workspace.matrices(rows.shape[0], rows.shape[1], rows.device)
        signed.copy_(rows)
        torch.abs(signed, out=magnitude)
    n_tokens = signed.shape[1]
    rank_from_top = n_tokens - max(1, -(-n_tokens * 999 // 1000)) + 1
    max_abs = magnitude.amax(dim=1)
    p999_abs = max_abs.clone() if rank_from_top == 1 else magnitude.topk(rank_from_top, dim=1).values[:, -1].contiguous()
    return ChannelStats(
        mean_abs=magnitude.mean(dim=1),
        mean=signed.mean(dim=1),
        max_abs=max_abs,
        median_abs=magnitude.median(dim=1).values,
        p999_abs=p999_abs,
        median_all=float(magnitude.flatten().median()),
        n_tokens=int(n_tokens),
    )


def merge_channel_stats(parts: Sequence[ChannelStats]) -> ChannelStats:
    """Merge statistics of several calls (batches, prompts, seeds) into one `ChannelStats`.

    Means are weighted by token count (exact); max_abs is the maximum (exact); median_abs,
    p999_abs and median_all are token-weighted means of the per-call values (approximate). Merging
    is associative, so merging pairwise as calls arrive equals merging all at once (up to rounding).
    """
    if not parts:
        raise InvalidArgumentError("merge_channel_stats got no statistics; pass at least one ChannelStats.")
    widths = sorted({part.num_channels for part in parts})
    if len(widths) != 1:
        raise InvalidArgumentError(
            f"cannot merge channel statistics of different widths C={widths}; "
            "merge only statistics recorded at the same hook point of the same model."
        )
    if len(parts) == 1:
        return parts[0]
    weights = torch.tensor([part.n_tokens for part in parts], dtype=torch.float64)
    weights = weights / weights.sum()

    def weighted(name: str) -> torch.Tensor:
        stacked = torch.stack([getattr(part, name).double() for part in parts])
        return (weights[:, None] * stacked).sum(dim=0).float()

    return ChannelStats(
        mean_abs=weighted("mean_abs"),
        mean=weighted("mean"),
        max_abs=torch.stack([part.max_abs for part in parts]).amax(dim=0),
        median_abs=weighted("median_abs"),
        p999_abs=weighted("p999_abs"),
        median_all=float(sum(w * part.median_all for w, part in zip(weights.tolist(), parts))),
        n_tokens=sum(part.n_tokens for part in parts),
        n_calls=sum(part.n_calls for part in parts),
    )


Cell = tuple[int, int]
"""A (block, step) key: global block index and denoising-step index."""


class StatsTable:
    """Channel statistics per (block, step); adding to an existing cell merges into it.

    `timesteps` optionally maps step index -> scheduler timestep (for plots against t); `meta` holds
    JSON-able provenance (model, prompt, branch, hook point, ...).
    """

    def __init__(
        self,
        cells: Mapping[Cell, ChannelStats] | None = None,
        *,
        timesteps: Mapping[int, float] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._cells: dict[Cell, ChannelStats] = {}
        self.timesteps: dict[int, float] = {int(k): float(v) for k, v in (timesteps or {}).items()}
        self.meta: dict[str, Any] = dict(meta or {})
        for (block, step), stats in (cells or {}).items():
            self.add(block, step, stats)

    def add(self, block: int, step: int, stats: ChannelStats) -> None:
        """Store `stats` at (block, step), merging with what is already there."""
        if self._cells and stats.num_channels != self.num_channels:
            raise InvalidArgumentError(
                f"statistics for block {block}, step {step} have C={stats.num_channels} channels but this "
                f"table holds C={self.num_channels}; keep one table per hook point and model."
            )
        key = (int(block), int(step))
        previous = self._cells.get(key)
        self._cells[key] = stats if previous is None else merge_channel_stats([previous, stats])

    @property
    def num_channels(self) -> int:
        """C of every cell (0 for an empty table)."""
        return next(iter(self._cells.values())).num_channels if self._cells else 0

    @property
    def blocks(self) -> list[int]:
        """Sorted block indices present in the table."""
        return sorted({block for block, _ in self._cells})

    @property
    def steps(self) -> list[int]:
        """Sorted step indices present in the table."""
        return sorted({step for _, step in self._cells})

    def __len__(self) -> int:
        return len(self._cells)

    def __contains__(self, key: object) -> bool:
        return key in self._cells

    def __iter__(self) -> Iterator[Cell]:
        return iter(sorted(self._cells))

    def items(self) -> list[tuple[Cell, ChannelStats]]:
        """(block, step) -> stats pairs sorted by block, then step."""
        return [(key, self._cells[key]) for key in self]

    def __getitem__(self, key: Cell) -> ChannelStats:
        block, step = key
        if (block, step) not in self._cells:
            raise InvalidArgumentError(
                f"no statistics for block {block}, step {step}; recorded blocks {self.blocks} and steps "
                f"{self.steps}. Record that block and step, or pick one of these."
            )
        return self._cells[(block, step)]

    def select(self, blocks: Iterable[int] | None = None, steps: Iterable[int] | None = None) -> StatsTable:
        """A new table restricted to `blocks` and `steps` (None keeps all); unknown ones raise."""
        chosen_blocks = self._checked("blocks", blocks, self.blocks)
        chosen_steps = self._checked("steps", steps, self.steps)
        cells = {key: stats for key, stats in self._cells.items() if key[0] in chosen_blocks and key[1] in chosen_steps}
        timesteps = {step: t for step, t in self.timesteps.items() if step in chosen_steps}
        return StatsTable(cells, timesteps=timesteps, meta=self.meta)

    @staticmethod
    def _checked(kind: str, wanted: Iterable[int] | None, present: list[int]) -> set[int]:
        if wanted is None:
            return set(present)
        wanted = [int(value) for value in wanted]
        unknown = sorted(set(wanted) - set(present))
        if unknown:
            raise InvalidArgumentError(f"{kind} {unknown} are not in this table; it has {kind} {present}.")
        return set(wanted)

    def stack(self, statistic: str) -> torch.Tensor:
        """Stack a statistic into (n_blocks, n_steps, C), or (n_blocks, n_steps) for "median_all".

        Rows follow `self.blocks`, columns `self.steps`. Every (block, step) pair must be present;
        `select` a full grid first if the recording was ragged.
        """
        missing = [(b, s) for b in self.blocks for s in self.steps if (b, s) not in self._cells]
        if missing:
            raise InvalidArgumentError(
                f"cannot stack {statistic!r}: cells {missing[:5]}{' ...' if len(missing) > 5 else ''} are missing. "
                "Use table.select(blocks=..., steps=...) to pick a complete grid."
            )
        if statistic == "median_all":
            return torch.tensor([[self._cells[(b, s)].median_all for s in self.steps] for b in self.blocks])
        rows = [torch.stack([self._cells[(b, s)].statistic(statistic) for s in self.steps]) for b in self.blocks]
        return torch.stack(rows)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `StatsTable.from_dict` restores an equal table."""
        return {
            "format": "ditf.massive.StatsTable",
            "version": 1,
            "meta": self.meta,
            "timesteps": {str(step): t for step, t in sorted(self.timesteps.items())},
            "cells": [{"block": b, "step": s, "stats": stats.to_dict()} for (b, s), stats in self.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StatsTable:
        """Rebuild a table from `to_dict` output."""
        if data.get("format") != "ditf.massive.StatsTable" or "cells" not in data:
            raise InvalidArgumentError(
                f"not a StatsTable dict (format={data.get('format')!r}, keys {sorted(data)}); "
                "pass the output of StatsTable.to_dict() or a file written by save_stats_table()."
            )
        table = cls(timesteps={int(k): v for k, v in data.get("timesteps", {}).items()}, meta=data.get("meta"))
        for cell in data["cells"]:
            table.add(cell["block"], cell["step"], ChannelStats.from_dict(cell["stats"]))
        return table


def merge_stats_tables(tables: Sequence[StatsTable]) -> StatsTable:
    """Cell-wise merge of tables (e.g. one per prompt) into one; cells present in any table are kept.

    The merged `meta` keeps what the tables agree on; a key whose values differ (e.g. `prompt`) holds the list of
    every table's value, in order.
    """
    if not tables:
        raise InvalidArgumentError("merge_stats_tables got no tables; pass at least one StatsTable.")
    meta: dict[str, Any] = {}
    for key in dict.fromkeys(k for table in tables for k in table.meta):
        values = [table.meta.get(key) for table in tables]
        meta[key] = values[0] if all(value == values[0] for value in values) else values
    merged = StatsTable(timesteps=tables[0].timesteps, meta=meta)
    for table in tables:
        for (block, step), stats in table.items():
            merged.add(block, step, stats)
    return merged


class DepthProfile(NamedTuple):
    """Largest and median magnitudes per block at one step (Sun et al.'s layer-wise profile)."""

    blocks: list[int]
    top: torch.Tensor  # (n_blocks, top_n): largest per-channel max|x|, descending
    median: torch.Tensor  # (n_blocks,): median |x| over all entries


def depth_profile(table: StatsTable, step: int, top_n: int = 3) -> DepthProfile:
    """Top-`top_n` channel maxima of |x| and the overall median |x| for every block at `step`.

    The top values are the largest per-channel maxima, so two large entries in one channel count
    once (Sun et al. rank entries; with reduced statistics the channel maximum is what is kept).
    """
    blocks = [block for block in table.blocks if (block, step) in table]
    if not blocks:
        raise InvalidArgumentError(f"step {step} is not in the table; recorded steps {table.steps}.")
    if not 1 <= top_n <= table.num_channels:
        raise InvalidArgumentError(f"top_n={top_n} must be in [1, C={table.num_channels}].")
    top = torch.stack([table[(block, step)].max_abs.topk(top_n).values for block in blocks])
    median = torch.tensor([table[(block, step)].median_all for block in blocks])
    return DepthProfile(blocks, top, median)


class StepProfile(NamedTuple):
    """Chosen channels' statistic against denoising step at one block."""

    steps: list[int]
    timesteps: list[float] | None  # scheduler t per step when the table knows them
    values: torch.Tensor  # (n_steps, n_channels)
    median: torch.Tensor  # (n_steps,): median |x| over all entries


def step_profile(table: StatsTable, block: int, channels: Sequence[int], statistic: str = "mean_abs") -> StepProfile:
    """`statistic` of `channels` at `block` for every recorded step (MA magnitude against t)."""
    steps = [step for step in table.steps if (block, step) in table]
    if not steps:
        raise InvalidArgumentError(f"block {block} is not in the table; recorded blocks {table.blocks}.")
    index = check_channels(channels, table.num_channels)
    values = torch.stack([table[(block, step)].statistic(statistic)[index] for step in steps])
    median = torch.tensor([table[(block, step)].median_all for step in steps])
    timesteps = [table.timesteps[s] for s in steps] if all(s in table.timesteps for s in steps) else None
    return StepProfile(steps, timesteps, values, median)
