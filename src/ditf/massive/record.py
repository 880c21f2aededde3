"""Record the residual stream and AdaLN vectors at named hook points while a DiT runs.

Hook points per block k (global index, see `ArchSpec.blocks`):
- `image`: the image-token residual stream entering block k, (B, N_img, C);
- `text`: the text-token stream entering block k, (B, N_txt, C) (blocks with a text stream only);
- `output`: the image stream leaving block k, read from what the block returns (the adapter's
  `read_block_output`; a ControlNet residual added between blocks is not part of it);
- `shift`, `scale`, `gate`: block k's image-stream AdaLN vectors, (B, C) or (B, N_img, C).

Streams are reduced on the fly to per-channel statistics (`ChannelStats`, one per block, step and
branch; memory O(C) each) unless `full=True` keeps the tensors (on the CPU). AdaLN vectors are small
and always kept whole. Whole tensors add up (FLUX.1-dev at 1024 px: 4096 tokens x 3072 channels per block and
step, ~40 GB for 57 blocks and 28 steps in bf16), so a `LargeRecordingWarning` gives the estimated size before a
recording of whole tensors above `warn_bytes` starts; transport sources keep only their channels
(`ditf.massive.sources`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.indices import format_indices
from ditf.massive.actions import BlockCall, CallState, ScopedAction
from ditf.massive.scopes import BlockSpec, StepSpec
from ditf.massive.session import Session
from ditf.massive.stats import ChannelStats, StatsTable, StatsWorkspace, channel_stats
from ditf.massive.tensorstore import format_bytes

STREAM_POINTS: tuple[str, ...] = ("image", "text", "output")
MODULATION_POINTS: tuple[str, ...] = ("shift", "scale", "gate")
POINTS: tuple[str, ...] = STREAM_POINTS + MODULATION_POINTS
"""Every hook point a `Record` can watch."""

TensorKey = tuple[str, int, int, str]
"""(point, block, step, branch)."""

WARN_BYTES = 1e9
"""Default size above which recording whole tensors warns first (1 GB)."""


class LargeRecordingWarning(UserWarning):
    """A recording of whole tensors is about to need a lot of memory or disk; the message gives the estimate."""


def estimated_cells(action: ScopedAction, session: Session, state: CallState) -> int:
    """How many (block, step, branch) cells `action` will record in this run: its blocks x the steps in scope x the
    branches it covers that the run has (cond, plus uncond when the run runs CFG)."""
    total = state.total_steps
    resolved = action.steps.resolved(total)
    steps = len(resolved) if resolved is not None else total or len(action.steps.values) or 1
    present = {"cond"} | ({"uncond"} if session.cfg_scale is not None else set()) | set(state.branches)
    branches = len(present if action.branches is None else present & action.branches) or 1
    return len(action.blocks) * steps * branches


def warn_large_recording(what: str, cell_bytes: int, cells: int, limit: float, fix: str) -> None:
    """Warn (`LargeRecordingWarning`) when `cells` cells of `cell_bytes` bytes each exceed `limit` bytes."""
    total = cell_bytes * cells
    if total > limit:
        warnings.warn(
            f"{what} will keep about {format_bytes(total)} ({cells} block x step x branch cells of "
            f"{format_bytes(cell_bytes)}); {fix}",
            LargeRecordingWarning, stacklevel=2,
        )


@dataclass
class Recording:
    """What a `Record` saw: statistics tables, whole tensors and the timestep of every step.

    `tables[(point, branch)]` is a `StatsTable` over (block, step) for stream points;
    `tensors[(point, block, step, branch)]` holds whole tensors (CPU) for AdaLN points and, with
    `full=True`, for streams. `timesteps[step]` is the step's timestep (see `CallState.t`).
    """

    tables: dict[tuple[str, str], StatsTable] = field(default_factory=dict)
    tensors: dict[TensorKey, torch.Tensor] = field(default_factory=dict)
    timesteps: dict[int, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self, point: str = "image", branch: str = "cond") -> StatsTable:
        """The statistics table of a stream point and branch."""
        if (point, branch) not in self.tables:
            raise InvalidArgumentError(
                f"no statistics for point {point!r}, branch {branch!r}; this recording has "
                f"{sorted(self.tables) or 'none'}. Record that point and branch (Record(points=..., branch=...))."
            )
        return self.tables[(point, branch)]

    def tensor(self, point: str, block: int, step: int, branch: str = "cond") -> torch.Tensor:
        """The whole tensor recorded at (point, block, step, branch)."""
        key = (point, int(block), int(step), branch)
        if key not in self.tensors:
            have = sorted({(p, b) for p, _, _, b in self.tensors if p == point})
            blocks = format_indices({k for p, k, _, b in self.tensors if p == point and b == branch})
            steps = format_indices({s for p, _, s, b in self.tensors if p == point and b == branch})
            raise InvalidArgumentError(
                f"the recording holds no {point!r} tensor at block {block}, step {step}, branch {branch!r} "
                f"(it has {point!r} for branches {[b for _, b in have] or 'none'}, blocks {blocks or 'none'}, "
                f"steps {steps or 'none'}). Record it with Record(points=({point!r},), blocks=..., steps=..., "
                "full=True) and the same branch."
            )
        return self.tensors[key]

    def adaln(self, block: int, step: int, branch: str = "cond", row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shift, scale, gate) of block k at a step for one batch row, each (C,) or (N, C)."""
        return tuple(self.tensor(point, block, step, branch)[row] for point in MODULATION_POINTS)  # type: ignore[return-value]

    @property
    def branches(self) -> list[str]:
        """Branches present in the recording."""
        return sorted({b for _, b in self.tables} | {key[3] for key in self.tensors})

    @property
    def steps(self) -> list[int]:
        """Steps present in the recording."""
        return sorted({s for table in self.tables.values() for s in table.steps} | {key[2] for key in self.tensors})

    @property
    def blocks(self) -> list[int]:
        """Blocks present in the recording."""
        return sorted({b for table in self.tables.values() for b in table.blocks} | {key[1] for key in self.tensors})


class Record(ScopedAction):
    """Record hook points at chosen blocks, steps and CFG branch.

    points: any of `POINTS`; blocks: 'all', 'last', indices or '5-20'; steps: 'all', 'last', indices
    (with a bare transformer and unknown step count, 'last' keeps only the latest step seen);
    branch: 'cond' (default), 'uncond', 'detail', 'all' or a list; each branch is recorded
    separately. full: keep whole stream tensors too (True, or a list of stream points); stats: compute
    per-channel statistics of streams; latest_only: keep only the latest step in scope (memory of one
    step, e.g. whole tensors at the last of `steps`); device/dtype: where and how whole tensors are stored;
    warn_bytes: warn (`LargeRecordingWarning`, with the estimate) before keeping more whole tensors than this.
    """

    def __init__(self, points: Iterable[str] | str = ("image",), *, blocks: BlockSpec = "all", steps: StepSpec = "all",
                 branch: str | Iterable[str] = "cond", full: bool | Iterable[str] = False, stats: bool = True,
                 latest_only: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 warn_bytes: float = WARN_BYTES):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        self.points = (points,) if isinstance(points, str) else tuple(points)
        unknown = [p for p in self.points if p not in POINTS]
        if unknown or not self.points:
            raise InvalidArgumentError(f"points={list(self.points)!r}; valid hook points: {', '.join(POINTS)}.")
        recorded_streams = tuple(p for p in self.points if p in STREAM_POINTS)
        full_points = recorded_streams if full is True else () if full is False else tuple(full)
        bad = [p for p in full_points if p not in self.points or p not in STREAM_POINTS]
        if bad:
            raise InvalidArgumentError(
                f"full={list(full_points)!r} names {bad}, which are not recorded stream points {list(self.points)}; "
                "pass full=True or a subset of the recorded image/text/output points."
            )
        self.full_points = set(full_points)
        if not stats and not self.full_points and not set(self.points) & set(MODULATION_POINTS):
            raise InvalidArgumentError("stats=False without full tensors would record nothing; keep stats or set full=True.")
        self.keep_stats = stats
        self.latest_only = latest_only
        self.device = torch.device(device)
        self.dtype = dtype
        self.warn_bytes = warn_bytes
        self.recording = Recording()
        self._stats: dict[tuple[str, str], dict[tuple[int, int], list[ChannelStats]]] = {}
        self._latest_step = -1
        self._warned = False
        self._workspace = StatsWorkspace()

    # -------------------------------------------------------------- scope
    def bind(self, session: Session) -> None:
        super().bind(session)
        self._session = session
        self.recording.meta.update({
            "model": type(session.transformer).__name__, "family": session.arch.family,
            "pipeline": type(session.pipeline).__name__ if session.pipeline is not None else None,
            "cfg_layout": session.layout.kind,
            "points": list(self.points), **self.scope(),
        })  # fmt: skip

    def input_blocks(self) -> tuple[int, ...]:
        wants_inputs = set(self.points) - {"output"}
        return self.blocks if wants_inputs else ()

    def output_blocks(self) -> tuple[int, ...]:
        return self.blocks if "output" in self.points else ()

    def start_run(self, state: CallState) -> None:
        super().start_run(state)
        if state.run > 0 and self.full_points:
            raise InvalidArgumentError(
                "a Record with full tensors saw a second pipeline run in one session; whole tensors are kept per "
                "trajectory. Use one intervene() session per pipeline call (statistics-only Records may span runs)."
            )

    # -------------------------------------------------------------- recording
    def _keeps_latest_only(self, state: CallState) -> bool:
        return self.latest_only or (self.steps.kind == "last" and state.total_steps is None)

    def _new_step(self, state: CallState) -> None:
        """When only the latest step is kept ('last' with an unknown step count, or latest_only), drop older ones."""
        if not self._keeps_latest_only(state) or state.step <= self._latest_step:
            return
        self._latest_step = state.step
        self.recording.tensors = {k: v for k, v in self.recording.tensors.items() if k[2] == state.step}
        for cells in self._stats.values():
            for cell in [c for c in cells if c[1] != state.step]:
                del cells[cell]

    def _store(self, point: str, block: int, state: CallState, branch: str, value: torch.Tensor) -> None:
        self._new_step(state)
        if state.t is not None:
            self.recording.timesteps[state.step] = state.t
        if point in STREAM_POINTS and self.keep_stats:
            table = self._stats.setdefault((point, branch), {})
            table.setdefault((block, state.step), []).append(channel_stats(value, self._workspace))
        if point in self.full_points and not self._warned:
            self._warned = True
            cells = 1 if self._keeps_latest_only(state) else estimated_cells(self, self._session, state)
            bytes_per_value = torch.empty((), dtype=self.dtype or value.dtype).element_size()
            warn_large_recording(f"Record(full={sorted(self.full_points)})", value.numel() * bytes_per_value
                                 * len(self.full_points), cells,
                                 self.warn_bytes, "record fewer blocks and steps, keep statistics only (full=False), "
                                 "or record transport sources with their channels only (record_trajectory).")
        if point in MODULATION_POINTS or point in self.full_points:
            stored = value.detach().to(self.device, self.dtype or value.dtype, copy=True)
            key = (point, block, state.step, branch)
            previous = self.recording.tensors.get(key)
            self.recording.tensors[key] = stored if previous is None else torch.cat([previous, stored])

    def on_block_input(self, call: BlockCall) -> None:
        state = call.state
        for branch, rows in state.rows_in(self.branches):
            for point in self.points:
                if point == "output":
                    continue
                if point == "text":
                    value = call.stream("text")
                elif point == "image":
                    value = call.image
                else:
                    value = getattr(call.inputs, point)
                self._store(point, call.block.index, state, branch, value[rows])
            self.mark(state)

    def on_block_output(self, block: int, state: CallState, image: torch.Tensor) -> None:
        for branch, rows in state.rows_in(self.branches):
            self._store("output", block, state, branch, image[rows])
            self.mark(state)

    def finish(self, session: Session) -> None:
        super().finish(session)
        self.recording.meta["time_units"] = session.time_units
        for key, cells in self._stats.items():
            table = StatsTable(timesteps=self.recording.timesteps, meta={**self.recording.meta, "point": key[0], "branch": key[1]})
            for (block, step), parts in sorted(cells.items()):
                for stats in parts:
                    table.add(block, step, stats)
            self.recording.tables[key] = table

    def describe(self) -> dict[str, Any]:
        return {"action": "Record", "points": list(self.points), "full": sorted(self.full_points),
                **self.scope(), "applied": self.applied}


__all__ = ["MODULATION_POINTS", "POINTS", "Record", "Recording", "STREAM_POINTS"]
