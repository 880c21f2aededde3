"""The clean reference pass: statistics of the unmodified stream that detected channels and controls come from.

A disruption 'auto' at every block, and its bottom-k / random-k / magnitude-matched controls, pick their channels
per block, step and branch from one unmodified generation with the same prompt, seed and settings (Turri et al.:
"compute the top-k set and the bottom-k set from an unmodified pass"). Detecting on the stream being edited
instead finds nothing below the first edited block, so the disruption would edit a few calls and its control all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ditf.arch import ArchSpec
from ditf.massive.actions import Action
from ditf.massive.record import Record, Recording
from ditf.massive.sampling import seeded
from ditf.massive.scopes import BlockSpec, resolve_blocks
from ditf.massive.session import intervene


def record_reference(pipe: Any, prompt: str, *, blocks: BlockSpec = "all", seed: int = 0,
                     **pipe_kwargs: Any) -> tuple[Any, Recording]:
    """Run `pipe(prompt, ...)` unchanged (seeded with `seed`) and keep per-channel statistics of the image stream
    entering `blocks` at every step and CFG branch. Returns (the pipeline's output, the `Recording`): pass it as
    `reference=` of edits with detected channels or controls. Memory: O(C) per block, step and branch."""
    record = Record(points=("image",), blocks=blocks, steps="all", branch="all")
    with intervene(pipe, [record]):
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    record.recording.meta.update(kind="clean pass", prompt=prompt, seed=seed)
    return output, record.recording


def actions_needing_reference(actions: Sequence[Action]) -> list[Action]:
    """The actions (children included) whose channels still need a clean reference pass."""
    found, pending = [], list(actions)
    while pending:
        action = pending.pop(0)
        if getattr(action, "needs_reference", lambda: False)():
            found.append(action)
        pending[:0] = action.children()
    return found


def reference_blocks(actions: Sequence[Action], arch: ArchSpec) -> list[int]:
    """The union of the blocks `actions` are scoped to, resolved on the model (`arch`)."""
    return sorted({block for action in actions for block in resolve_blocks(action.block_spec, arch)})


__all__ = ["actions_needing_reference", "record_reference", "reference_blocks"]
