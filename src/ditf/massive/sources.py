"""Transport sources: a source trajectory's image stream at the transported channels only.

Activation transport writes X_s * M into the target with M = p m^T, so the source is needed only on its channel
set m, at the transported blocks and steps. `SourceRecord` keeps, per (block, step, branch), the channels m that
its selector picks on that call's own (unmodified) source stream and the values X_s[..., m] (B, N, |m|), in memory
or streamed to a safetensors file (`store=path`, read back memory-mapped, one cell at a time). FLUX.1-dev at
1024 px with two massive channels: ~26 MB for 57 blocks and 28 steps, against ~40 GB for whole tensors. A source of
every channel (`channels=None`, needed only when the target picks m) warns with its estimated size first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.indices import format_indices
from ditf.massive.actions import BlockCall, CallState, ScopedAction
from ditf.massive.channels import AllChannels, ChannelSpec, parse_channels
from ditf.massive.record import WARN_BYTES, estimated_cells, warn_large_recording
from ditf.massive.scopes import BlockSpec, StepSpec
from ditf.massive.session import Session
from ditf.massive.stats import StatsWorkspace, channel_stats
from ditf.massive.tensorstore import TensorStore, format_bytes

SOURCE_FORMAT = "ditf.massive.TransportSource"
CellKey = tuple[int, int, str]
"""(block, step, branch)."""


def _name(key: CellKey) -> str:
    return f"image/{key[0]}/{key[1]}/{key[2]}"


class TransportSource:
    """The source's image stream per (block, step, branch): the channels m kept there and their values (B, N, |m|).

    `complete` is True when every cell keeps all C channels. `timesteps[step]` is the step's timestep and
    `meta["time_units"]` its units (see `CallState.t`); `meta["source"]` says what the source was.
    """

    def __init__(self, store: TensorStore, cells: Mapping[CellKey, list[int] | None], num_channels: int,
                 timesteps: Mapping[int, float] | None = None, meta: Mapping[str, Any] | None = None):
        self.store = store
        self._cells = {key: None if channels is None or len(channels) == num_channels else list(channels)
                       for key, channels in cells.items()}
        self.num_channels = int(num_channels)
        self.timesteps = {int(k): float(v) for k, v in (timesteps or {}).items()}
        self.meta = dict(meta or {})

    # -------------------------------------------------------------- building
    @classmethod
    def from_tensors(cls, tensors: Mapping[CellKey, torch.Tensor], *, timesteps: Mapping[int, float] | None = None,
                     meta: Mapping[str, Any] | None = None) -> TransportSource:
        """A complete source from whole image streams (B, N, C) per (block, step, branch), kept in memory."""
        if not tensors:
            raise InvalidArgumentError("tensors is empty; pass the image stream of at least one block, step and branch.")
        widths = {value.shape[-1] for value in tensors.values()}
        if len(widths) != 1 or any(value.ndim != 3 for value in tensors.values()):
            raise InvalidArgumentError("every source tensor must be (B, N, C) with the same C.")
        store = TensorStore()
        for key, value in tensors.items():
            store.put(_name(key), value)
        return cls(store, dict.fromkeys(tensors), widths.pop(), timesteps, meta)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TransportSource:
        """A source written to disk by `record_trajectory(..., store=path)`, mapped for reading."""
        store = TensorStore.open(path)
        index = store.metadata
        if index.get("format") != SOURCE_FORMAT:
            raise InvalidArgumentError(f"{path} is not a transport source (format {index.get('format')!r}); write one "
                                       "with record_trajectory(..., store=...).")
        cells = {(c["block"], c["step"], c["branch"]): c["channels"] for c in index["cells"]}
        return cls(store, cells, index["num_channels"], {int(k): v for k, v in index["timesteps"].items()}, index["meta"])

    def index(self) -> dict[str, Any]:
        """The JSON index of the source (stored in its file's metadata)."""
        return {"format": SOURCE_FORMAT, "version": 1, "num_channels": self.num_channels,
                "timesteps": {str(k): v for k, v in sorted(self.timesteps.items())}, "meta": self.meta,
                "cells": [{"block": b, "step": s, "branch": br, "channels": self._cells[(b, s, br)]}
                          for b, s, br in sorted(self._cells)]}

    # -------------------------------------------------------------- reading
    @property
    def complete(self) -> bool:
        """True when every cell keeps every channel (a target may then choose m itself)."""
        return all(channels is None for channels in self._cells.values())

    @property
    def blocks(self) -> list[int]:
        return sorted({b for b, _, _ in self._cells})

    @property
    def steps(self) -> list[int]:
        return sorted({s for _, s, _ in self._cells})

    @property
    def branches(self) -> list[str]:
        return sorted({br for _, _, br in self._cells})

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values (file size when on disk)."""
        return self.store.nbytes

    def _check(self, block: int, step: int, branch: str) -> CellKey:
        key = (int(block), int(step), branch)
        if key not in self._cells:
            raise InvalidArgumentError(
                f"the transport source holds no image stream at block {block}, step {step}, branch {branch!r} (it has "
                f"blocks {format_indices(self.blocks) or 'none'}, steps {format_indices(self.steps) or 'none'}, "
                f"branches {self.branches}); record the source over every block, step and branch you transport."
            )
        return key

    def channels(self, block: int, step: int, branch: str) -> list[int]:
        """The channels m kept at (block, step, branch), sorted."""
        kept = self._cells[self._check(block, step, branch)]
        return list(range(self.num_channels)) if kept is None else kept

    def values(self, block: int, step: int, branch: str) -> torch.Tensor:
        """X_s[..., m] at (block, step, branch): (B, N, |m|)."""
        return self.store.get(_name(self._check(block, step, branch)))

    def describe(self) -> dict[str, Any]:
        """JSON summary: what the source is, its scope and size."""
        return {"source": self.meta.get("source"), "blocks": format_indices(self.blocks),
                "steps": format_indices(self.steps), "branches": self.branches, "complete": self.complete,
                "channels": self.meta.get("channels"), "bytes": self.nbytes,
                "file": str(self.store.path) if self.store.on_disk else None}


class SourceRecord(ScopedAction):
    """Record a transport source: the image stream entering `blocks` at `steps` and `branch`, kept on the channels
    that `channels` picks on each call's own stream (None: every channel; a complete source).

    store: None (memory) or a `.safetensors` path (streamed to disk, memory-mapped when read). warn_bytes: warn
    with the estimated size before keeping whole streams above this many bytes. meta: provenance merged into the
    source's `meta`, e.g. {"source": {"kind": "prompt", "prompt": ..., "seed": ...}}.
    """

    def __init__(self, channels: ChannelSpec | None = "auto", *, blocks: BlockSpec = "all", steps: StepSpec = "all",
                 branch: str | Iterable[str] = "all", store: str | os.PathLike[str] | None = None,
                 warn_bytes: float = WARN_BYTES, meta: Mapping[str, Any] | None = None):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        self.meta = dict(meta or {})
        self.selector = AllChannels() if channels is None else parse_channels(channels)
        self.store = TensorStore(store)
        self.warn_bytes = warn_bytes
        self.source: TransportSource | None = None
        self._cells: dict[CellKey, list[int]] = {}
        self._timesteps: dict[int, float] = {}
        self._num_channels = 0
        self._warned = False
        self._workspace = StatsWorkspace()

    def bind(self, session: Session) -> None:
        super().bind(session)
        self._session = session
        width = session.arch.width
        if width is not None and not self.selector.needs_statistics:
            self.selector.select(width)

    def start_run(self, state: CallState) -> None:
        super().start_run(state)
        if state.run > 0:
            raise InvalidArgumentError(
                "a transport source records one trajectory, but the session saw a second pipeline run; record each "
                "source in its own intervene() session."
            )

    def on_block_input(self, call: BlockCall) -> None:
        state = call.state
        for branch, rows in state.rows_in(self.branches):
            x = call.image[rows]
            width = x.shape[-1]
            stats = channel_stats(x, self._workspace) if self.selector.needs_statistics else None
            channels = self.selector.select(width, stats)
            if not self._warned:
                self._warned = True
                if len(channels) == width:
                    warn_large_recording("a transport source of every channel", x.numel() * x.element_size(),
                                         estimated_cells(self, self._session, state), self.warn_bytes,
                                         "keep only the transported channels (channels='auto' or a list), fewer blocks "
                                         "and steps, or store it on disk (store='source.safetensors').")
            key = (call.block.index, state.step, branch)
            self.store.put(_name(key), x[..., channels] if len(channels) < width else x)
            self._cells[key] = channels
            self._num_channels = width
            if state.t is not None:
                self._timesteps[state.step] = state.t
            self.mark(state)

    def finish(self, session: Session) -> None:
        super().finish(session)
        meta = {"time_units": session.time_units, "channels": self.selector.describe(), "scope": self.scope(),
                **self.meta}
        self.source = TransportSource(self.store, self._cells, self._num_channels, self._timesteps, meta)
        self.store.close(self.source.index())

    def abandon(self) -> None:
        self.store.discard()

    def describe(self) -> dict[str, Any]:
        size = format_bytes(self.store.nbytes)
        return {"action": "SourceRecord", "channels": self.selector.describe(), **self.scope(), "applied": self.applied,
                "size": size}


__all__ = ["SOURCE_FORMAT", "SourceRecord", "TransportSource"]
