"""`intervene`: hooks that watch and change a DiT's residual stream while a diffusers pipeline samples.

    with intervene(pipe, [Record(...), Zero(channels="auto", blocks="5-20")]) as session:
        image = pipe("a corgi", num_inference_steps=28).images[0]
    session.cache  # what Record saw

A pre-hook on the transformer tracks where the sampler is: the denoising step (a new step starts when
the timestep passed to the transformer goes down, a new run when it goes up, a further call of the same
step when it repeats) and the classifier-free-guidance branch of every batch row (the family adapter's
`CfgLayout` for the pipeline). Pre-hooks on the blocks read the block inputs through the adapter
(`read_block_inputs`) and hand them to the actions in list order; an action may write changed streams
back (`replace_image_input`, `replace_text_input`). Forward hooks read a block's image-stream output
exactly (`read_block_output`). The adapter's `forward_context` is held for the session. Every hook is
removed when the `with` block ends, whatever happens in it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ditf.arch import ArchSpec, BlockRef, CfgLayout, arch_for
from ditf.errors import DitfError, InvalidArgumentError, UnsupportedLayoutError
from ditf.massive.actions import Action, BlockCall, CallState, ScopedAction


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
        self._contexts = ExitStack()
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
            self._contexts.enter_context(self.arch.forward_context())
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
        inputs: dict[int, list[Action]] = {}
        outputs: dict[int, list[Action]] = {}
        for action in self._all_actions:
            for k in action.input_blocks():
                inputs.setdefault(k, []).append(action)
            for k in action.output_blocks():
                outputs.setdefault(k, []).append(action)
        self._inputs, self._outputs = inputs, outputs
        for k in sorted(inputs):
            ref = self.arch.block(k)
            self._handles.append(ref.module.register_forward_pre_hook(
                lambda _m, args, kwargs, ref=ref: self._block_input(ref, args, kwargs), with_kwargs=True))
        for k in sorted(outputs):
            ref = self.arch.block(k)
            self._handles.append(ref.module.register_forward_hook(
                lambda _m, args, kwargs, out, ref=ref: self._block_output(ref, args, kwargs, out), with_kwargs=True))

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._contexts.close()

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
    def _block_state(self, ref: BlockRef) -> CallState:
        if self.state is None:
            raise DitfError(f"block {ref.index} ran outside a transformer forward; intervene() hooks the whole model.")
        return self.state

    def _block_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._block_state(ref)
        actives = [a for a in self._inputs[ref.index] if a.active(ref.index, state)]
        if not actives:
            return None
        call = BlockCall(ref, state, self.arch.read_block_inputs(ref, args, kwargs))
        for action in actives:
            action.on_block_input(call)
        if not call.changed:
            return None
        if "image" in call.changed:
            args, kwargs = self.arch.replace_image_input(ref, args, kwargs, call.image)
        if "text" in call.changed:
            args, kwargs = self.arch.replace_text_input(ref, args, kwargs, call.text)
        return args, kwargs

    def _block_output(self, ref: BlockRef, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._block_state(ref)
        listeners = [a for a in self._outputs[ref.index] if a.active(ref.index, state)]
        if not listeners:
            return None
        image = self.arch.read_block_output(ref, args, kwargs, output)
        for action in listeners:
            action.on_block_output(ref.index, state, image)
        return None


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
    layout = resolve_cfg_layout(cfg_layout, pipeline, arch, actions)
    session = Session(transformer, arch, actions, layout, pipeline)
    with session:
        yield session


def resolve_cfg_layout(spec: CfgLayout | str | None, pipeline: Any, arch: ArchSpec,
                       actions: Sequence[Action] = ()) -> CfgLayout:
    """The CFG layout a session uses: `spec` when given, else the one `arch` knows for `pipeline`'s class.

    A bare transformer (or a pipeline without a scheduler) has no CFG: every call is `cond`. A pipeline
    the adapter does not know is an error only when some action is scoped to a branch.
    """
    if isinstance(spec, CfgLayout):
        return spec
    if isinstance(spec, str):
        if spec not in ("none", "sequential", "batched"):
            raise InvalidArgumentError(f"cfg_layout={spec!r}; valid: 'none', 'sequential', 'batched' or a CfgLayout.")
        return CfgLayout(spec)  # type: ignore[arg-type]
    if pipeline is None or getattr(pipeline, "scheduler", None) is None:
        return CfgLayout("none")  # no sampler (a bare transformer, a DiTFeaturizer): every call is `cond`
    known = arch.cfg_layout(pipeline)
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


__all__ = ["Session", "intervene", "resolve_cfg_layout"]
