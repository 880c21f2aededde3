"""Temporary hooks on transformer blocks: read what enters block k, and stop the forward there."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from ditf.arch.base import ArchSpec, BlockInputs, BlockRef


class StopForward(Exception):
    """Raised by a tap to end the transformer's forward after the tapped block's inputs were read."""


@contextmanager
def block_pre_hook(block: BlockRef, hook: Callable[[tuple, dict], tuple[tuple, dict] | None]) -> Iterator[None]:
    """Run `hook(args, kwargs)` before every call of `block`; a returned (args, kwargs) replaces the call's.

    The hook is removed when the context exits, whatever happens inside it.
    """
    handle = block.module.register_forward_pre_hook(lambda _m, args, kwargs: hook(args, kwargs), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def tap_block(arch: ArchSpec, k: int, stop: bool = True) -> Iterator[list[BlockInputs]]:
    """Collect the `BlockInputs` of block k for every forward run inside the context.

    With `stop=True` the forward is ended right after block k's inputs are read (later blocks and the
    final layer never run); use `run_until` to call the model then.
    """
    block = arch.block(k)
    captured: list[BlockInputs] = []

    def hook(args: tuple, kwargs: dict) -> None:
        captured.append(arch.read_block_inputs(block, args, kwargs))
        if stop:
            raise StopForward

    with block_pre_hook(block, hook):
        yield captured


@contextmanager
def tap_blocks(arch: ArchSpec, ks: Sequence[int]) -> Iterator[dict[int, BlockInputs]]:
    """Collect the `BlockInputs` of every block in `ks` (global indices) during one forward inside the context,
    keyed by index, and end the forward right after the deepest one's inputs are read (later blocks and the final
    layer never run); call the model with `run_until`."""
    refs = sorted({arch.block(k).index: arch.block(k) for k in ks}.items())
    captured: dict[int, BlockInputs] = {}
    deepest = refs[-1][0]

    def hook_for(index: int, ref: BlockRef) -> Callable[[tuple, dict], None]:
        def hook(args: tuple, kwargs: dict) -> None:
            captured[index] = arch.read_block_inputs(ref, args, kwargs)
            if index == deepest:
                raise StopForward

        return hook

    with ExitStack() as hooks:
        for index, ref in refs:
            hooks.enter_context(block_pre_hook(ref, hook_for(index, ref)))
        yield captured


def run_until(call: Callable[[], Any]) -> None:
    """Run `call()` (a transformer forward under a stopping tap) and swallow the tap's early stop."""
    try:
        call()
    except StopForward:
        return
