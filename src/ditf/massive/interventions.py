"""Hooks that watch and change a DiT's residual stream while a diffusers pipeline samples.

    with intervene(pipe, [Record(...), Zero(channels="auto", blocks="5-20")]) as session:
        image = pipe("a corgi", num_inference_steps=28).images[0]
    session.cache  # what Record saw

A pre-hook on the transformer tracks where the sampler is: the denoising step (a new step starts when
the timestep passed to the transformer goes down, a new run when it goes up, a further call of the same
step when it repeats) and the classifier-free-guidance branch of every batch row (see `CfgLayout`).
Pre-hooks on the blocks read the block inputs through the family adapter (`read_block_inputs`) and
hand them to the actions in list order; an action may write a changed image stream back
(`replace_image_input`). Every hook is removed when the `with` block ends, whatever happens in it.

Scopes (which blocks, steps, branches and tokens an action touches) are checked against the model and
the run: a block or step that does not exist, or an action that never fired, is an error, never
silently ignored.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from ditf.arch import ArchSpec, BlockInputs, BlockRef, arch_for
from ditf.errors import DitfError, InvalidArgumentError, UnsupportedLayoutError
from ditf.massive.detect import (
    DetectionRule,
    RatioRule,
    SunRule,
    TopKRule,
    bottom_k_channels,
    magnitude_matched_channels,
    random_k_channels,
)
from ditf.massive.stats import channel_stats, check_channels

BRANCHES: tuple[str, ...] = ("cond", "uncond", "detail", "extra")
"""Names of the CFG branches a transformer call (or a batch half of one) can belong to.

`cond` / `uncond`: the conditional and unconditional predictions of classifier-free guidance;
`detail`: the extra, disrupted prediction of Detail Guidance; `extra`: any further call in a step
(e.g. SD3's skip-layer guidance). A call without CFG is `cond`.
"""

# --------------------------------------------------------------------------------------- indices


def parse_indices(text: str, name: str) -> list[int]:
    """'5-20' | '3,7,9-11' | '-1' -> a list of ints (ranges inclusive); errors name the argument."""
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                split = part.index("-", 1)
                start, stop = int(part[:split]), int(part[split + 1:])
                if stop < start:
                    raise ValueError(part)
                values.extend(range(start, stop + 1))
            else:
                values.append(int(part))
        except ValueError as err:
            raise InvalidArgumentError(
                f"{name}={text!r} is not a list of indices: use numbers and inclusive ranges such as '5-20' or '3,7,9-11'."
            ) from err
    if not values:
        raise InvalidArgumentError(f"{name}={text!r} names no index; use e.g. '5-20', '3,7', 'all' or 'last'.")
    return values


def format_indices(values: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sorted, inclusive ranges)."""
    ordered = sorted(set(int(v) for v in values))
    parts: list[str] = []
    start = previous = None
    for value in ordered + [None]:
        if start is not None and (value is None or value != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if value is not None and start is None:
            start = value
        previous = value
    return ",".join(parts)


BlockSpec = str | int | Iterable[int]
"""'all', 'last', an int, a list of ints or a string such as '5-20' (global block indices k)."""

StepSpec = str | int | Iterable[int]
"""'all', 'last', an int (negative counts from the end), a list, or a string such as '0-3'."""


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
    return tuple(sorted({arch.block(k).index for k in wanted}))


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


# --------------------------------------------------------------------------------------- CFG layouts


@dataclass(frozen=True)
class CfgLayout:
    """How a pipeline lays out classifier-free guidance over transformer calls and batch rows.

    `none`: one call per step, every row is `cond`. `sequential`: one call per branch in `order`
    (call 0 is `order[0]`, ...); a step with fewer calls simply has fewer branches (no CFG -> only
    `cond`). `batched`: one call whose batch is split in halves `order[0]`, `order[1]` when CFG is on.
    Further calls in a step are `extra`.
    """

    kind: Literal["none", "sequential", "batched"]
    order: tuple[str, ...] = ("cond", "uncond")

    def rows(self, call: int, batch: int, cfg_active: bool) -> tuple[tuple[str, slice], ...]:
        """Branch -> batch rows of the `call`-th transformer call of a step with `batch` rows."""
        everything = slice(0, batch)
        if self.kind == "none":
            return (("cond" if call == 0 else "extra", everything),)
        if self.kind == "sequential":
            return ((self.order[call] if call < len(self.order) else "extra", everything),)
        if call > 0:
            return (("extra", everything),)
        if not cfg_active:
            return (("cond", everything),)
        half = batch // 2
        return ((self.order[0], slice(0, half)), (self.order[1], slice(half, batch)))


PIPELINE_CFG_LAYOUTS: dict[str, CfgLayout] = {
    "FluxPipeline": CfgLayout("sequential"),
    "FluxImg2ImgPipeline": CfgLayout("sequential"),
    "FluxInpaintPipeline": CfgLayout("sequential"),
    "Flux2Pipeline": CfgLayout("sequential"),
    "Flux2KleinPipeline": CfgLayout("sequential"),
    "QwenImagePipeline": CfgLayout("sequential"),
    "QwenImageImg2ImgPipeline": CfgLayout("sequential"),
    "StableDiffusion3Pipeline": CfgLayout("batched", ("uncond", "cond")),
    "StableDiffusion3Img2ImgPipeline": CfgLayout("batched", ("uncond", "cond")),
    "PixArtAlphaPipeline": CfgLayout("batched", ("uncond", "cond")),
    "PixArtSigmaPipeline": CfgLayout("batched", ("uncond", "cond")),
    "SanaPipeline": CfgLayout("batched", ("uncond", "cond")),
    "DiTPipeline": CfgLayout("batched", ("cond", "uncond")),
}
"""CFG layout of each supported diffusers pipeline class (read from their `__call__` in diffusers 0.42).

FLUX.1 (true CFG), Qwen-Image and FLUX.2-klein call the transformer once for the conditional and then
once for the unconditional prediction; SD3, PixArt and Sana concatenate [uncond, cond] into one batch;
DiT concatenates [cond, uncond]. FLUX.1-dev and FLUX.2-dev without true CFG make one call per step.
"""


def cfg_layout_for(pipeline: Any) -> CfgLayout | None:
    """The layout of `pipeline`'s class, or None when ditf does not know it (pass `cfg_layout=` then)."""
    return PIPELINE_CFG_LAYOUTS.get(type(pipeline).__name__)


# --------------------------------------------------------------------------------------- call state


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


# --------------------------------------------------------------------------------------- channels


class ChannelSelector(ABC):
    """Picks channels from the activations x (B, N, C) of one block call (per block and step)."""

    @abstractmethod
    def select(self, x: torch.Tensor) -> list[int]:
        """Sorted channel indices for activations x (B, N, C)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The selector's rule and parameters, JSON-able."""


@dataclass(frozen=True)
class ExplicitChannels(ChannelSelector):
    """A fixed list of channels (checked against the model's width when first used)."""

    channels: tuple[int, ...]

    def select(self, x: torch.Tensor) -> list[int]:
        return sorted(check_channels(self.channels, x.shape[-1]))

    def describe(self) -> dict[str, Any]:
        return {"selector": "explicit", "channels": list(self.channels)}


@dataclass(frozen=True)
class DetectedChannels(ChannelSelector):
    """Massive channels detected on the fly in the very activations being changed (per block, step, branch).

    `rule` is a `ditf.massive.detect` rule; the default `RatioRule(100)` flags channels whose median
    |x| over tokens is >= 100x the median over channels (DiTF style); `TopKRule(k)` is Turri et al.'s.
    """

    rule: DetectionRule = field(default_factory=RatioRule)

    def select(self, x: torch.Tensor) -> list[int]:
        return self.rule.detect(channel_stats(x))

    def describe(self) -> dict[str, Any]:
        return {"selector": "detected", **self.rule.describe()}


@dataclass(frozen=True)
class ControlChannels(ChannelSelector):
    """A control set for a comparison: `bottom`-k, `random`-k or `matched` (magnitude-matched) channels.

    Its size is `k`, or (k=None) the size of the set `like` selects in the same activations, so each
    control is "an equally-sized set" (Turri et al.). `statistic` ranks channels for bottom-k and
    matching (mean |x| over tokens by default). `matched` picks, for every channel of `like`'s set,
    the unused channel with the nearest log-magnitude (the DG reviewers' magnitude-matched control;
    massive channels are outliers, so the match is the closest available, not equal).
    """

    kind: Literal["bottom", "random", "matched"]
    k: int | None = None
    like: ChannelSelector = field(default_factory=DetectedChannels)
    statistic: str = "mean_abs"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("bottom", "random", "matched"):
            raise InvalidArgumentError(f"control kind={self.kind!r}; valid: 'bottom', 'random', 'matched'.")
        if self.kind == "matched" and self.k is not None:
            raise InvalidArgumentError("a magnitude-matched control takes its size from `like`; leave k=None.")

    def select(self, x: torch.Tensor) -> list[int]:
        reference = self.like.select(x)
        stats = channel_stats(x)
        if self.kind == "matched":
            return magnitude_matched_channels(stats.statistic(self.statistic), reference, seed=self.seed)
        k = len(reference) if self.k is None else self.k
        if self.kind == "bottom":
            return bottom_k_channels(stats.statistic(self.statistic), k, exclude=reference)
        return random_k_channels(x.shape[-1], k, seed=self.seed, exclude=reference)

    def describe(self) -> dict[str, Any]:
        return {"selector": self.kind, "k": self.k, "like": self.like.describe(), "statistic": self.statistic, "seed": self.seed}


@dataclass(frozen=True)
class AllChannels(ChannelSelector):
    """Every channel."""

    def select(self, x: torch.Tensor) -> list[int]:
        return list(range(x.shape[-1]))

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


# --------------------------------------------------------------------------------------- tokens


TokenSpec = str | torch.Tensor
"""'image' (every image token), 'text' (the text stream), or a bool (h, w) mask over image tokens."""


def token_mask(spec: TokenSpec, num_tokens: int) -> torch.Tensor | None:
    """The (N,) bool mask of image tokens a spec covers (None = all of the stream)."""
    if isinstance(spec, str):
        return None
    mask = spec
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise InvalidArgumentError(
            f"tokens mask has dtype {mask.dtype} and shape {tuple(mask.shape)}; pass a bool (h, w) mask on the "
            "latent token grid (True = change that token)."
        )
    if mask.numel() != num_tokens:
        raise InvalidArgumentError(
            f"tokens mask of shape {tuple(mask.shape)} covers {mask.numel()} tokens, but the image stream has "
            f"{num_tokens}; make the mask on the token grid of this resolution (image size / patch stride)."
        )
    return mask.reshape(-1)


def check_tokens(spec: TokenSpec) -> TokenSpec:
    """Validate a token spec early (string names; mask dtype and rank)."""
    if isinstance(spec, str):
        if spec not in ("image", "text"):
            raise InvalidArgumentError(f"tokens={spec!r}; valid: 'image', 'text', or a bool (h, w) mask of image tokens.")
        return spec
    if not isinstance(spec, torch.Tensor) or spec.dtype != torch.bool or spec.ndim != 2:
        raise InvalidArgumentError("tokens must be 'image', 'text', or a bool torch tensor (h, w) on the token grid.")
    return spec


def describe_tokens(spec: TokenSpec) -> Any:
    """JSON form of a token spec."""
    if isinstance(spec, str):
        return spec
    return {"mask": list(spec.shape), "selected": int(spec.sum())}


def entry_mask(num_tokens: int, num_channels: int, tokens: torch.Tensor | None, channels: Sequence[int],
               device: torch.device) -> torch.Tensor:
    """(N, C) bool mask: True at the chosen tokens (None = all) x chosen channels."""
    channel_mask = torch.zeros(num_channels, dtype=torch.bool, device=device)
    channel_mask[list(channels)] = True
    token_part = torch.ones(num_tokens, dtype=torch.bool, device=device) if tokens is None else tokens.to(device)
    return token_part[:, None] & channel_mask[None, :]


# --------------------------------------------------------------------------------------- edit ops


class Op(ABC):
    """How selected entries change: values(x, mask, t) gives the new values of x (B, N, C) where mask (N, C) is True."""

    @abstractmethod
    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        """New values for x (B, N, C); only entries under `mask` (N, C) are used."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The operation and its parameters, JSON-able."""


class ZeroOp(Op):
    """Set to 0."""

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return torch.zeros_like(x)

    def describe(self) -> dict[str, Any]:
        return {"op": "zero"}


@dataclass(frozen=True)
class MeanOp(Op):
    """Set to the channel's mean over the selected tokens of each sample (Sun et al.'s `set_mean`),
    or to fixed per-channel `means` (C,) (e.g. `ChannelStats.mean` from a calibration recording)."""

    means: torch.Tensor | None = None

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        if self.means is not None:
            if self.means.shape != (x.shape[-1],):
                raise InvalidArgumentError(
                    f"means has shape {tuple(self.means.shape)}; this stream has C={x.shape[-1]} channels: pass (C,)."
                )
            return self.means.to(x.device, torch.float32).expand(x.shape)
        weights = mask.float()
        count = weights.sum(dim=0).clamp_min(1.0)
        mean = (x.float() * weights).sum(dim=1, keepdim=True) / count
        return mean.expand(x.shape)

    def describe(self) -> dict[str, Any]:
        return {"op": "mean", "source": "tokens" if self.means is None else "given"}


@dataclass(frozen=True)
class ConstantOp(Op):
    """Set to a constant `value`."""

    value: float

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return torch.full_like(x, float(self.value))

    def describe(self) -> dict[str, Any]:
        return {"op": "constant", "value": float(self.value)}


@dataclass(frozen=True)
class ScaleOp(Op):
    """Multiply by rho: a number, or a function of the timestep t (0..1000, see `CallState.t`)."""

    rho: float | Callable[[float | None], float]

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        rho = self.rho(t) if callable(self.rho) else self.rho
        if not isinstance(rho, (int, float)) or not math.isfinite(rho):
            raise InvalidArgumentError(f"rho(t={t}) returned {rho!r}; it must return a finite number.")
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

    def values(self, x: torch.Tensor, mask: torch.Tensor, t: float | None) -> torch.Tensor:
        return x.clamp(min=self.low, max=self.high)

    def describe(self) -> dict[str, Any]:
        return {"op": "clamp", "low": self.low, "high": self.high}


def parse_op(text: str) -> Op:
    """'zero' | 'mean' | 'const:V' | 'scale:R' | 'clamp:V' (|x| <= V) -> an `Op`."""
    name, _, argument = text.strip().partition(":")
    try:
        if name == "zero" and not argument:
            return ZeroOp()
        if name == "mean" and not argument:
            return MeanOp()
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


# --------------------------------------------------------------------------------------- edits


class Edit(ScopedAction):
    """Change chosen channels of chosen tokens at chosen blocks, steps and branches with an `Op`.

    channels: a selector or spec (`parse_channels`), resolved per block call on that call's own
    activations (so 'auto' finds each block's massive channels); tokens: 'image', 'text', or a bool
    (h, w) mask of image tokens. Selected entries take the op's values; all others keep their exact bits.
    """

    def __init__(self, op: Op, channels: ChannelSpec = "auto", *, blocks: BlockSpec = "all", steps: StepSpec = "all",
                 tokens: TokenSpec = "image", branch: str | Iterable[str] = "all"):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        self.op = op
        self.channels = parse_channels(channels)
        self.tokens = check_tokens(tokens)

    def on_block_input(self, call: BlockCall) -> None:
        stream = "text" if self.tokens == "text" else "image"
        for branch, rows in call.state.rows_in(self.branches):
            x = call.stream(stream)[rows]
            channels = self.channels.select(x)
            selected_tokens = token_mask(self.tokens, x.shape[1]) if stream == "image" else None
            entry = {"block": call.block.index, "step": call.state.step, "branch": branch, "channels": channels,
                     "tokens": x.shape[1] if selected_tokens is None else int(selected_tokens.sum())}
            self.mark(call.state, entry)
            if not channels or entry["tokens"] == 0:
                continue
            mask = entry_mask(x.shape[1], x.shape[2], selected_tokens, channels, x.device)
            new = self.op.values(x, mask, call.state.t).to(x.dtype)
            call.write(stream, rows, torch.where(mask, new, x))

    def describe(self) -> dict[str, Any]:
        return {"action": type(self).__name__, **self.op.describe(), "channels": self.channels.describe(),
                "tokens": describe_tokens(self.tokens), **self.scope(), "applied": self.applied, "log": self.log}


class Zero(Edit):
    """Set the channels to 0 (Turri et al.'s disruption probe; DiTF's channel discard)."""

    def __init__(self, channels: ChannelSpec = "auto", **scope: Any):
        super().__init__(ZeroOp(), channels, **scope)


class SetMean(Edit):
    """Set the channels to their mean over the selected tokens (or to given `means` (C,))."""

    def __init__(self, channels: ChannelSpec = "auto", *, means: torch.Tensor | None = None, **scope: Any):
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


# --------------------------------------------------------------------------------------- session


@dataclass(frozen=True)
class _StepOverride:
    step: int
    t: float | None
    total_steps: int | None


class Session:
    """The live state of an `intervene` block: hooks, the sampler position and the actions."""

    def __init__(self, transformer: nn.Module, arch: ArchSpec, actions: Sequence[Action], layout: CfgLayout,
                 pipeline: Any = None):
        self.transformer = transformer
        self.arch = arch
        self.pipeline = pipeline
        self.layout = layout
        self.actions = list(actions)
        self.state: CallState | None = None
        self.calls = 0
        self.steps_seen: set[int] = set()
        self.branches_seen: set[str] = set()
        self.timesteps: dict[int, float] = {}
        self.total_steps_known = False
        self.time_units = "none"
        """Units of `CallState.t` in the latest call: 'scheduler' (0..1000 from the pipeline's scheduler),
        'given' (by `at_step`), 'transformer' (the raw value passed to the transformer) or 'none' (no call yet)."""
        self._run = -1
        self._last_raw: float | None = None
        self._mode: str | None = None
        self._override: _StepOverride | None = None
        self._aux: str | None = None
        self._handles: list[Any] = []
        self._forward_params = list(inspect.signature(transformer.forward).parameters)
        flat: list[Action] = []
        pending = list(self.actions)
        while pending:
            action = pending.pop(0)
            flat.append(action)
            pending[:0] = action.children()
        self._all_actions = flat

    # ------------------------------------------------------------------ results
    @property
    def recordings(self) -> list[Any]:
        """The `Recording` of every `Record` action, in order."""
        return [action.recording for action in self._all_actions if hasattr(action, "recording")]

    @property
    def cache(self) -> Any:
        """The `Recording` of the session's single `Record` action."""
        recordings = self.recordings
        if len(recordings) != 1:
            raise InvalidArgumentError(
                f"session.cache needs exactly one Record action; this session has {len(recordings)}. "
                "Use session.recordings (one per Record, in order)."
            )
        return recordings[0]

    def describe(self) -> list[dict[str, Any]]:
        """JSON record of every top-level action with what it did."""
        return [action.describe() for action in self.actions]

    # ------------------------------------------------------------------ manual control
    @contextmanager
    def at_step(self, step: int, t: float | None = None, total_steps: int | None = None) -> Iterator[None]:
        """Count every transformer call inside as step `step` at timestep `t` (single noised-image forwards).

        Use it in step order: entering step 0 after another step starts a new run, and several calls at
        the same step are further calls of that step (e.g. ensemble chunks; all in the `cond` branch of a
        bare transformer). `total_steps` lets 'last' and negative step indices resolve.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"step={step!r} must be an int >= 0.")
        previous = self._override
        self._override = _StepOverride(step, None if t is None else float(t), total_steps)
        try:
            yield
        finally:
            self._override = previous

    def new_run(self) -> None:
        """Treat the next transformer call as step 0 of a new run (only needed when two runs of one step
        follow each other: the step tracker otherwise sees a repeated timestep as a further call)."""
        self._last_raw = None
        self.state = None

    @contextmanager
    def auxiliary(self, branch: str) -> Iterator[None]:
        """Calls inside are extra predictions of the current step in branch `branch` (e.g. 'detail')."""
        if self.state is None:
            raise DitfError("auxiliary() needs a current step: call it from inside a transformer hook.")
        saved, self._aux = self.state, branch
        try:
            yield
        finally:
            self._aux = None
            self.state = saved

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> Session:
        try:
            for action in self._all_actions:
                action.bind(self)
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._remove()
        if exc_type is None:
            for action in self._all_actions:
                action.finish(self)

    def _install(self) -> None:
        self._handles.append(self.transformer.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        if any(action.wants_transformer_output for action in self._all_actions):
            self._handles.append(self.transformer.register_forward_hook(self._end_call, with_kwargs=True))
        refs = self.arch.blocks()
        last = len(refs) - 1
        inputs: dict[int, list[Action]] = {}
        outputs: dict[int, list[Action]] = {}
        for action in self._all_actions:
            for k in action.input_blocks():
                inputs.setdefault(k, []).append(action)
            for k in action.output_blocks():
                outputs.setdefault(k, []).append(action)
        self._inputs, self._outputs = inputs, outputs
        hooked = set(inputs) | {k + 1 for k in outputs if k < last}
        for k in sorted(hooked):
            ref = self.arch.block(k)
            self._handles.append(ref.module.register_forward_pre_hook(
                lambda _m, args, kwargs, ref=ref: self._block_input(ref, args, kwargs), with_kwargs=True))
        if last in outputs:
            ref = self.arch.block(last)
            self._handles.append(ref.module.register_forward_hook(
                lambda _m, args, kwargs, out, ref=ref: self._last_block_output(ref, args, kwargs, out), with_kwargs=True))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # ------------------------------------------------------------------ step tracking
    def _scheduler_timesteps(self) -> list[float] | None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        return None if timesteps is None else [float(t) for t in timesteps]

    def _pipeline_total_steps(self) -> int | None:
        if self.pipeline is None:
            return None
        total = getattr(self.pipeline, "_num_timesteps", None)
        schedule = self._scheduler_timesteps()
        if isinstance(total, int) and total > 0:
            return total
        return None if schedule is None else len(schedule)

    def _raw_timestep(self, args: tuple, kwargs: dict) -> float:
        if "timestep" in kwargs:
            value = kwargs["timestep"]
        elif "timestep" in self._forward_params and self._forward_params.index("timestep") < len(args):
            value = args[self._forward_params.index("timestep")]
        else:
            raise UnsupportedLayoutError(
                f"{type(self.transformer).__name__} was called without a `timestep` argument, so intervene() cannot "
                "tell the denoising steps apart; call the transformer with timestep=..."
            )
        return float(torch.as_tensor(value).flatten()[0])

    def _batch(self, args: tuple, kwargs: dict) -> tuple[int, torch.Tensor | None]:
        latents = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(latents, torch.Tensor):
            raise UnsupportedLayoutError(
                f"{type(self.transformer).__name__} was called without a `hidden_states` tensor; intervene() needs it "
                "to size the batch."
            )
        return latents.shape[0], latents

    def _cfg_active(self, latents: torch.Tensor) -> bool:
        flag = getattr(self.pipeline, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        # Pipelines without the property (PixArt, DiT) duplicate the latents for the two halves.
        half = latents.shape[0] // 2
        return latents.shape[0] % 2 == 0 and torch.equal(latents[:half], latents[half:])

    def _begin_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch, latents = self._batch(args, kwargs)
        if self._aux is not None:
            self.state = replace(self.state, rows=((self._aux, slice(0, batch)),))
            self.branches_seen.add(self._aux)
            self.calls += 1
            return None
        mode = "given" if self._override is not None else "timestep"
        fresh = self.state is None or self._mode != mode
        self._mode = mode
        if mode == "given":
            new_run, step, call, t, total = self._position_given(fresh)
        else:
            new_run, step, call, t, total = self._position_from_timestep(fresh, self._raw_timestep(args, kwargs))
        if new_run:
            self._run += 1
        if total is not None and step >= total:
            raise InvalidArgumentError(
                f"the transformer ran a step {step} but the run has only {total} steps; intervene() lost track of the "
                "sampler (were the timesteps not decreasing?)."
            )
        rows = self.layout.rows(call, batch, self._cfg_active(latents) if self.layout.kind == "batched" else False)
        self.state = CallState(self._run, step, call, t, total, rows)
        self.calls += 1
        self.steps_seen.add(step)
        self.branches_seen.update(self.state.branches)
        self.total_steps_known = self.total_steps_known or total is not None
        if t is not None:
            self.timesteps[step] = t
        if new_run:
            for action in self._all_actions:
                action.start_run(self.state)
        return None

    def _position_given(self, fresh: bool) -> tuple[bool, int, int, float | None, int | None]:
        """(new run?, step, call, t, total) of a call inside `at_step`."""
        override, previous = self._override, self.state
        same_step = not fresh and previous.step == override.step
        new_run = fresh or (not same_step and override.step == 0)
        call = previous.call + 1 if same_step and not new_run else 0
        self.time_units = "given"
        return new_run, override.step, call, override.t, override.total_steps

    def _position_from_timestep(self, fresh: bool, raw: float) -> tuple[bool, int, int, float | None, int | None]:
        """(new run?, step, call, t, total) from the timestep the transformer got: a lower one is the next step,
        the same one a further call of this step, a higher one (or the first call) step 0 of a new run."""
        previous = self.state
        if fresh or self._last_raw is None or raw > self._last_raw:
            new_run, step, call = True, 0, 0
        elif raw == self._last_raw:
            new_run, step, call = False, previous.step, previous.call + 1
        else:
            new_run, step, call = False, previous.step + 1, 0
        self._last_raw = raw
        total = self._pipeline_total_steps()
        schedule = self._scheduler_timesteps()
        t, self.time_units = raw, "transformer"
        if total is not None and schedule is not None and len(schedule) >= total and step < total:
            t, self.time_units = schedule[len(schedule) - total + step], "scheduler"
        return new_run, step, call, t, total

    def _end_call(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._aux is not None or self.state is None:
            return None
        for action in self._all_actions:
            if action.wants_transformer_output:
                replaced = action.on_transformer_output(self, args, kwargs, output)
                if replaced is not None:
                    output = replaced
        return output

    # ------------------------------------------------------------------ block hooks
    def _block_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state is None:
            raise DitfError(f"block {ref.index} ran outside a transformer forward; intervene() hooks the whole model.")
        k = ref.index
        listeners = [a for a in self._outputs.get(k - 1, ()) if a.active(k - 1, state)]
        actives = [a for a in self._inputs.get(k, ()) if a.active(k, state)]
        if not listeners and not actives:
            return None
        inputs = self.arch.read_block_inputs(ref, args, kwargs)
        for action in listeners:
            action.on_block_output(k - 1, state, inputs.image)
        call = BlockCall(ref, state, inputs)
        for action in actives:
            action.on_block_input(call)
        if not call.changed:
            return None
        if "image" in call.changed:
            args, kwargs = self.arch.replace_image_input(ref, args, kwargs, call.image)
        if "text" in call.changed:
            args, kwargs = _replace_by_identity(ref, args, kwargs, inputs.text, call.text)
        return args, kwargs

    def _last_block_output(self, ref: BlockRef, args: tuple, kwargs: dict, output: Any) -> None:
        state = self.state
        listeners = [a for a in self._outputs.get(ref.index, ()) if a.active(ref.index, state)]
        if not listeners:
            return None
        inputs = self.arch.read_block_inputs(ref, args, kwargs)
        image = _image_output(ref, output, inputs)
        for action in listeners:
            action.on_block_output(ref.index, state, image)
        return None


def _replace_by_identity(ref: BlockRef, args: tuple, kwargs: dict, old: torch.Tensor, new: torch.Tensor) -> tuple[tuple, dict]:
    """Swap the argument that *is* `old` (the text stream the adapter read) for `new`."""
    for name, value in kwargs.items():
        if value is old:
            return args, {**kwargs, name: new}
    for index, value in enumerate(args):
        if value is old:
            return (*args[:index], new, *args[index + 1:]), kwargs
    raise UnsupportedLayoutError(
        f"block {ref.index} ({ref.path}) does not receive its text stream as one argument (the adapter slices it out "
        "of a joint sequence), so text-stream edits cannot be written back; edit tokens='image' instead."
    )


def _image_output(ref: BlockRef, output: Any, inputs: BlockInputs) -> torch.Tensor:
    """The image-stream tensor among a block's outputs, told apart from the text stream by shape."""
    candidates = [output] if isinstance(output, torch.Tensor) else [o for o in output if isinstance(o, torch.Tensor)]
    shape = inputs.image.shape
    matches = [o for o in candidates if o.shape == shape]
    ambiguous = inputs.text is not None and inputs.text.shape == shape
    if len(matches) != 1 or ambiguous:
        raise UnsupportedLayoutError(
            f"cannot tell which output of the last block {ref.index} ({ref.path}) is the image stream: outputs "
            f"{[tuple(o.shape) for o in candidates]}, image input {tuple(shape)}. Record 'output' at earlier blocks "
            "(their output is the next block's input), or use a prompt length that differs from the image token count."
        )
    return matches[0]


@contextmanager
def intervene(model: Any, actions: Sequence[Action] = (), *, cfg_layout: CfgLayout | str | None = None,
              arch: ArchSpec | None = None) -> Iterator[Session]:
    """Hook `actions` into a diffusers pipeline (or a bare transformer) for the duration of the block.

    model: a diffusers pipeline with a `.transformer`, or the transformer itself (then every call is the
    `cond` branch, steps follow the timesteps or `session.at_step`). cfg_layout: override the CFG layout
    ('none', 'sequential', 'batched' or a `CfgLayout`); needed for pipelines ditf does not know when an
    action is scoped to a branch. Raises for a transformer family without an adapter.
    """
    pipeline = None if isinstance(model, nn.Module) else model
    transformer = model if pipeline is None else getattr(pipeline, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise InvalidArgumentError(
            f"intervene() needs a diffusers DiT pipeline (with a .transformer) or a transformer module; got "
            f"{type(model).__name__}."
        )
    arch = arch if arch is not None else arch_for(transformer)
    layout = _layout(cfg_layout, pipeline, actions)
    session = Session(transformer, arch, actions, layout, pipeline)
    with session:
        yield session


def _layout(spec: CfgLayout | str | None, pipeline: Any, actions: Sequence[Action]) -> CfgLayout:
    if isinstance(spec, CfgLayout):
        return spec
    if isinstance(spec, str):
        if spec not in ("none", "sequential", "batched"):
            raise InvalidArgumentError(f"cfg_layout={spec!r}; valid: 'none', 'sequential', 'batched' or a CfgLayout.")
        return CfgLayout(spec)  # type: ignore[arg-type]
    if pipeline is None or getattr(pipeline, "scheduler", None) is None:
        return CfgLayout("none")  # no sampler (a bare transformer, a DiTFeaturizer): every call is `cond`
    known = cfg_layout_for(pipeline)
    if known is not None:
        return known
    scoped = [a for a in actions if isinstance(a, ScopedAction) and a.branches is not None]
    if scoped:
        raise InvalidArgumentError(
            f"ditf does not know how {type(pipeline).__name__} lays out classifier-free guidance, and "
            f"{type(scoped[0]).__name__} is scoped to branch {sorted(scoped[0].branches)}. Pass cfg_layout="
            "'sequential' (one transformer call per branch, cond first), 'batched' (one call, batch halves "
            "[uncond, cond]) or 'none', or scope the actions to branch='all'."
        )
    return CfgLayout("none")


__all__ = [
    "Action", "AllChannels", "BRANCHES", "BlockCall", "CallState", "CfgLayout", "ChannelSelector", "Clamp",
    "ClampOp", "ConstantOp", "ControlChannels", "DetectedChannels", "Edit", "ExplicitChannels", "MeanOp", "Op",
    "PIPELINE_CFG_LAYOUTS", "Scale", "ScaleOp", "ScopedAction", "Session", "SetConstant", "SetMean", "Steps",
    "Zero", "ZeroOp", "cfg_layout_for", "format_indices", "intervene", "parse_branches", "parse_channels",
    "parse_indices", "parse_op", "resolve_blocks",
]
