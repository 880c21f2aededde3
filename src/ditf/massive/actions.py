"""What an intervention is: an `Action` run at hook points, what it sees there (`CallState`, `BlockCall`),
and `ScopedAction`, the base of actions limited to blocks, steps and CFG branches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ditf.arch import BlockInputs, BlockRef
from ditf.errors import InvalidArgumentError
from ditf.indices import format_indices
from ditf.massive.scopes import BlockSpec, Steps, StepSpec, parse_branches, resolve_blocks

if TYPE_CHECKING:
    from ditf.massive.session import Session


@dataclass(frozen=True)
class CallState:
    """Where the sampler is during one transformer call.

    `t` is the scheduler timestep (0..1000) when the session knows the pipeline's scheduler (or was
    told with `at_step`), else the raw value passed to the transformer. `rows` maps each branch
    present in this call to its batch rows.
    """

    run: int
    step: int
    call: int
    t: float | None
    total_steps: int | None
    rows: tuple[tuple[str, slice], ...]

    @property
    def branches(self) -> list[str]:
        """Branches present in this call."""
        return [name for name, _ in self.rows]

    def rows_in(self, branches: frozenset[str] | None) -> list[tuple[str, slice]]:
        """(branch, rows) pairs of this call that `branches` covers (None covers all)."""
        return [(name, rows) for name, rows in self.rows if branches is None or name in branches]


class BlockCall:
    """One block's inputs in one forward, as actions read and change them.

    `image` is (B, N_img, C) and `text` (B, N_txt, C) or None; `write` replaces rows of a stream
    (copy-on-write, so the caller's tensors are never changed in place).
    """

    def __init__(self, block: BlockRef, state: CallState, inputs: BlockInputs):
        self.block = block
        self.state = state
        self.inputs = inputs
        self.image = inputs.image
        self.text = inputs.text
        self.changed: set[str] = set()

    def stream(self, which: str) -> torch.Tensor:
        """The current (possibly already changed) 'image' or 'text' stream."""
        tensor = self.image if which == "image" else self.text
        if tensor is None:
            raise InvalidArgumentError(
                f"block {self.block.index} ({self.block.path}) has no {which} stream in this model; "
                "scope text-stream actions to blocks that carry text tokens, or use tokens='image'."
            )
        return tensor

    def write(self, which: str, rows: slice, values: torch.Tensor) -> None:
        """Replace `stream(which)[rows]` with `values` (same shape)."""
        current = self.stream(which)
        if which not in self.changed:
            current = current.clone()
            self.changed.add(which)
        current[rows] = values.to(current.dtype)
        if which == "image":
            self.image = current
        else:
            self.text = current


# --------------------------------------------------------------------------------------- actions


class Action(ABC):
    """Something `intervene` runs at hook points: record, change or transplant activations.

    Subclasses declare the blocks whose inputs they need (`input_blocks`) or whose image-stream
    output they read (`output_blocks`), and react in `on_block_input` / `on_block_output` /
    `on_transformer_output`. `finish` runs when the session ends and raises if the action was
    scoped to something that never happened.
    """

    wants_transformer_output: bool = False

    def bind(self, session: Session) -> None:
        """Resolve model-dependent parts of the scope (called once, when the session starts)."""

    def children(self) -> list[Action]:
        """Actions this one runs through the session (e.g. Detail Guidance's disruption)."""
        return []

    def input_blocks(self) -> tuple[int, ...]:
        """Blocks whose inputs this action reads or changes."""
        return ()

    def output_blocks(self) -> tuple[int, ...]:
        """Blocks whose image-stream output this action reads."""
        return ()

    def active(self, block: int, state: CallState) -> bool:
        """Whether this action wants `block` in the call described by `state`."""
        return False

    def start_run(self, state: CallState) -> None:
        """Called at the first transformer call of every run (validate steps once the total is known)."""

    def on_block_input(self, call: BlockCall) -> None:
        """Read or change the inputs of a block this action is active at."""

    def on_block_output(self, block: int, state: CallState, image: torch.Tensor) -> None:
        """Read the image-stream output (B, N_img, C) of `block`."""

    def on_transformer_output(self, session: Session, args: tuple, kwargs: dict, output: Any) -> Any:
        """Return a replacement for the transformer's output, or None to keep it."""
        return None

    def finish(self, session: Session) -> None:
        """Check that the action did what it was scoped to do; raise otherwise."""

    def abandon(self) -> None:
        """Release what the action holds (e.g. a half-written file) when its session ends with an error."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the action, its parameters and what it did."""


class ScopedAction(Action):
    """An action limited to blocks, steps and CFG branches, which counts and checks where it fired."""

    def __init__(self, *, blocks: BlockSpec = "all", steps: StepSpec = "all", branch: str | Iterable[str] = "all"):
        self.block_spec = blocks
        self.steps = Steps.parse(steps)
        self.branches = parse_branches(branch)
        self.blocks: tuple[int, ...] = ()
        self.applied = 0
        self.log: list[dict[str, Any]] = []
        self._steps_hit: set[int] = set()

    def bind(self, session: Session) -> None:
        self.blocks = resolve_blocks(self.block_spec, session.arch)
        self._block_set = set(self.blocks)

    def input_blocks(self) -> tuple[int, ...]:
        return self.blocks

    def in_scope(self, state: CallState) -> bool:
        """True when this call's step and at least one of its branches are covered."""
        if not self.steps.contains(state.step, state.total_steps):
            return False
        return bool(state.rows_in(self.branches))

    def active(self, block: int, state: CallState) -> bool:
        return block in self._block_set and self.in_scope(state)

    def start_run(self, state: CallState) -> None:
        if state.total_steps is not None:
            self.steps.check(state.total_steps)

    def mark(self, state: CallState, entry: dict[str, Any] | None = None) -> None:
        """Count one application (and log `entry` when given)."""
        self.applied += 1
        self._steps_hit.add(state.step)
        if entry is not None:
            self.log.append(entry)

    def scope(self) -> dict[str, Any]:
        """The scope as JSON-able values."""
        return {
            "blocks": format_indices(self.blocks),
            "steps": self.steps.describe(),
            "branch": "all" if self.branches is None else sorted(self.branches),
        }

    def finish(self, session: Session) -> None:
        name = type(self).__name__
        if self.steps.kind == "list" and session.calls:
            missing = sorted(set(self.steps.values) - self._steps_hit)
            missing = [s for s in missing if s >= 0]
            if missing and not session.total_steps_known:
                raise InvalidArgumentError(
                    f"{name} was scoped to steps {missing}, which never ran: the session saw steps "
                    f"{format_indices(session.steps_seen) or 'none'}. Pick steps that the sampler runs."
                )
        if self.applied == 0:
            raise InvalidArgumentError(
                f"{name} ({self.scope()}) never applied: no transformer call matched its scope. The session saw "
                f"{session.calls} transformer calls, steps {format_indices(session.steps_seen) or 'none'} and "
                f"branches {sorted(session.branches_seen) or 'none'}. Widen the scope (e.g. branch='all'), or run "
                "the pipeline inside the `with intervene(...)` block."
            )


__all__ = ["Action", "BlockCall", "CallState", "ScopedAction"]
