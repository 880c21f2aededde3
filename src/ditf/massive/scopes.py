"""Where an action applies: blocks, denoising steps, CFG branches and image tokens, parsed and checked.

Every spec is checked against the model or the run it is used in: a block or step that does not exist
is an error that names the valid range, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ditf.arch import ArchSpec
from ditf.errors import InvalidArgumentError
from ditf.indices import format_indices, parse_indices

BRANCHES: tuple[str, ...] = ("cond", "uncond", "detail", "extra")
"""Names of the CFG branches a transformer call (or a batch half of one) can belong to.

`cond` / `uncond`: the conditional and unconditional predictions of classifier-free guidance;
`detail`: the extra, disrupted prediction of Detail Guidance; `extra`: any further call in a step
(e.g. SD3's skip-layer guidance). A call without CFG is `cond`.
"""

BlockSpec = str | int | Iterable[int]
"""'all', 'last', an int, a list of ints or a string such as '5-20' (global block indices k)."""

StepSpec = str | int | Iterable[int]
"""'all', 'last', an int (negative counts from the end), a list, or a string such as '0-3'."""

TokenSpec = str | torch.Tensor
"""'image' (every image token), 'text' (the text stream), or a bool (h, w) mask over image tokens."""


# --------------------------------------------------------------------------------------- blocks


def resolve_blocks(spec: BlockSpec, arch: ArchSpec) -> tuple[int, ...]:
    """Global block indices named by `spec`, each checked against the model (errors give the valid range)."""
    n = arch.num_blocks()
    if isinstance(spec, str):
        if spec == "all":
            wanted: list[int] = list(range(n))
        elif spec == "last":
            wanted = [n - 1]
        else:
            wanted = parse_indices(spec, "blocks")
    elif isinstance(spec, bool):
        raise InvalidArgumentError(f"blocks={spec!r} is not a block index; pass 'all', 'last', an int or a list.")
    elif isinstance(spec, int):
        wanted = [spec]
    else:
        wanted = list(spec)
        if not wanted:
            raise InvalidArgumentError("blocks is empty; pass 'all', 'last', an index or a non-empty list of indices.")
    outside = [k for k in wanted if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n]
    if outside:
        raise InvalidArgumentError(
            f"blocks={','.join(map(str, outside))} is out of range for this {arch.family} model: valid blocks are "
            f"0..{n - 1} ({arch.block_layout()})."
        )
    return tuple(sorted({arch.block(k).index for k in wanted}))


# --------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Steps:
    """Which denoising steps an action covers: all, the last one, or a list (negatives count from the end)."""

    kind: Literal["all", "last", "list"]
    values: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: StepSpec) -> Steps:
        """Build from 'all' | 'last' | int | list | '0-3'."""
        if isinstance(spec, Steps):
            return spec
        if isinstance(spec, str):
            if spec in ("all", "last"):
                return cls(spec)
            return cls("list", tuple(parse_indices(spec, "steps")))
        if isinstance(spec, bool):
            raise InvalidArgumentError(f"steps={spec!r} is not a step index; pass 'all', 'last', an int or a list.")
        if isinstance(spec, int):
            return cls("list", (spec,))
        values = tuple(int(v) for v in spec)
        if not values:
            raise InvalidArgumentError("steps is empty; pass 'all', 'last', a step index or a non-empty list.")
        return cls("list", values)

    def resolved(self, total: int | None) -> set[int] | None:
        """The step indices this covers in a run of `total` steps (None = every step, or not knowable yet)."""
        if self.kind == "all" or total is None:
            return None
        if self.kind == "last":
            return {total - 1}
        return {v % total if -total <= v < total else v for v in self.values}

    def check(self, total: int) -> None:
        """Raise when a listed step does not exist in a run of `total` steps."""
        if self.kind != "list":
            return
        missing = [v for v in self.values if not -total <= v < total]
        if missing:
            raise InvalidArgumentError(
                f"steps {missing} do not exist: this run has {total} denoising steps (0..{total - 1}; negative "
                "indices count from the end). Pick steps in that range or run more steps."
            )

    def contains(self, step: int, total: int | None) -> bool:
        """True when `step` of a run with `total` steps is covered (for 'last' with unknown total: always)."""
        resolved = self.resolved(total)
        if resolved is not None:
            return step in resolved
        if self.kind == "list":
            return step in self.values
        return True

    def describe(self) -> str:
        """'all', 'last' or '0-3,7'."""
        if self.kind != "list":
            return self.kind
        return format_indices(self.values) if min(self.values) >= 0 else ",".join(map(str, self.values))


# --------------------------------------------------------------------------------------- branches


def parse_branches(spec: str | Iterable[str]) -> frozenset[str] | None:
    """'all' -> None (every branch); 'cond' | ['cond', 'uncond'] -> that set, checked against `BRANCHES`."""
    if spec == "all":
        return None
    names = [spec] if isinstance(spec, str) else list(spec)
    unknown = [name for name in names if name not in BRANCHES]
    if unknown or not names:
        raise InvalidArgumentError(
            f"branch={spec!r} is not a CFG branch; valid: 'all', {', '.join(repr(b) for b in BRANCHES)} "
            "(or a list of them)."
        )
    return frozenset(names)


# --------------------------------------------------------------------------------------- tokens


def check_tokens(spec: TokenSpec) -> TokenSpec:
    """Validate a token spec early (string names; mask dtype and rank)."""
    if isinstance(spec, str):
        if spec not in ("image", "text"):
            raise InvalidArgumentError(f"tokens={spec!r}; valid: 'image', 'text', or a bool (h, w) mask of image tokens.")
        return spec
    if not isinstance(spec, torch.Tensor) or spec.dtype != torch.bool or spec.ndim != 2:
        raise InvalidArgumentError("tokens must be 'image', 'text', or a bool torch tensor (h, w) on the token grid.")
    return spec


def token_mask(spec: TokenSpec, num_tokens: int) -> torch.Tensor | None:
    """The (N,) bool mask of image tokens a spec covers (None = all of the stream)."""
    mask = check_tokens(spec)
    if isinstance(mask, str):
        return None
    if mask.numel() != num_tokens:
        raise InvalidArgumentError(
            f"tokens mask of shape {tuple(mask.shape)} covers {mask.numel()} tokens, but the image stream has "
            f"{num_tokens}; make the mask on the token grid of this resolution (image size / patch stride)."
        )
    return mask.reshape(-1)


def describe_tokens(spec: TokenSpec) -> Any:
    """JSON form of a token spec."""
    if isinstance(spec, str):
        return spec
    return {"mask": list(spec.shape), "selected": int(spec.sum())}


__all__ = [
    "BRANCHES", "BlockSpec", "StepSpec", "Steps", "TokenSpec", "check_tokens", "describe_tokens",
    "parse_branches", "resolve_blocks", "token_mask",
]
