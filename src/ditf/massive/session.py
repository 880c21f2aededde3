"""`intervene`: hooks that watch and change a DiT's residual stream while a diffusers pipeline samples.

    with intervene(pipe, [Record(...), Zero(channels=[154, 1446], blocks="5-20")]) as session:
        image = pipe("a corgi", num_inference_steps=28).images[0]
    session.cache  # what Record saw

Where the sampler is comes from diffusers' own signals (`ditf.massive.signals`):
- run: every pipeline call is one run (two `pipe(...)` calls in one session are runs 0 and 1);
- step: the index the pipeline passes to `callback_on_step_end` (chained to the user's own callback);
- t: the pipeline's scheduler timesteps at that step (0..1000);
- branch: the name the pipeline gives the call with `transformer.cache_context("cond" / "uncond")` (FLUX.1,
  Qwen-Image, FLUX.2-klein), or, for pipelines that batch CFG (SD3, PixArt, Sana, DiT), the batch halves of the
  family adapter's `CfgLayout` when the call's arguments run CFG (e.g. `guidance_scale` > 1); Detail Guidance's
  extra forward is `detail` in every session, nested ones included.
Fallbacks, used only where a signal is missing (documented guesses): a pipeline without `callback_on_step_end`
(PixArt, DiT) has its steps counted from the timestep passed to the transformer (a different one starts the next
step, the same one is a further call of the step); a sequential-CFG pipeline that sets no `cache_context` has its
branches by call order (`CfgLayout.order`); a batched pipeline whose CFG scale is not among its call arguments
is read from `do_classifier_free_guidance`, else from duplicated latents. A bare transformer (no pipeline) has
runs and steps from its timesteps (a higher one starts a new run) or from `session.at_step`.

Pre-hooks on the blocks read the block inputs through the adapter (`read_block_inputs`) and hand them to the
actions in list order; an action may write changed streams back (`replace_image_input`, `replace_text_input`).
Forward hooks read a block's image-stream output exactly (`read_block_output`). The adapter's `forward_context` is
held for the session. Every hook (and the pipeline and `cache_context` watches) is removed when the `with` block
ends, whatever happens in it.
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
from ditf.massive.signals import DITF_LABEL, PIPELINE_LABEL, TransformerWatch, watching


@dataclass(frozen=True)
class _StepOverride:
    step: int
    t: float | None
    total_steps: int | None


def _flatten(actions: Sequence[Action]) -> list[Action]:
    """Every action with its children (depth first), each checked to be new to this session and to any other."""
    flat: list[Action] = []
    pending = list(actions)
    while pending:
        action = pending.pop(0)
        if not isinstance(action, Action):
            raise InvalidArgumentError(f"actions must be ditf.massive actions (Record, Zero, ...); got {type(action).__name__}.")
        if any(action is seen for seen in flat):
            raise InvalidArgumentError(
                f"the same {type(action).__name__} object is listed twice; its counts and log would mix two "
                "applications. Create one object per intervention."
            )
        flat.append(action)
        pending[:0] = action.children()
    used = [action for action in flat if getattr(action, "_used_by_a_session", False)]
    if used:
        raise InvalidArgumentError(
            f"this {type(used[0]).__name__} object already ran in an earlier intervene() session, and its counts, "
            "log and recordings belong to that run. Create a new one for every session."
        )
    for action in flat:
        action._used_by_a_session = True
    return flat


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool, type(None))) for v in value):
        return list(value)
    return repr(value)


class Session:
    """The live state of an `intervene` block: hooks, the sampler position and the actions."""

    def __init__(self, transformer: nn.Module, arch: ArchSpec, actions: Sequence[Action], layout: CfgLayout,
                 pipeline: Any = None):
        self.transformer = transformer
        self.arch = arch
        self.pipeline = pipeline
        self.pipeline_class = type(pipeline) if pipeline is not None else None
        self.layout = layout
        self.actions = list(actions)
        self._all_actions = _flatten(self.actions)
        self.state: CallState | None = None
        self.calls = 0
        self.steps_seen: set[int] = set()
        self.branches_seen: set[str] = set()
        self.timesteps: dict[int, float] = {}
        self.total_steps_known = False
        self.time_units = "none"
        """Units of `CallState.t` in the latest call: 'scheduler' (0..1000 from the pipeline's scheduler),
        'given' (by `at_step`), 'transformer' (the raw value passed to the transformer) or 'none' (no call yet)."""
        self.runs: list[dict[str, Any]] = []
        """One JSON-able record per pipeline call: its guidance arguments, the CFG scale really used (None when no
        unconditional branch ran) and where its steps came from."""
        self.run_arguments: dict[str, Any] | None = None
        """Arguments of the current pipeline call (every parameter, defaults filled in); None outside one."""
        self.cfg_scale: float | None = None
        """CFG scale g of the current run when it runs an unconditional branch, else None."""
        self.cfg_known = True
        """False while a pipeline run's CFG scale could not be read (an unknown pipeline with a given layout)."""
        self._run = -1
        self._last_raw: float | None = None
        self._mode: str | None = None
        self._override: _StepOverride | None = None
        self._in_pipeline_run = False
        self._run_pending = False
        self._steps_reported = False
        self._next_step = 0
        self._stack: list[CallState | None] = []
        self._handles: list[Any] = []
        self._contexts = ExitStack()
        self._watch: TransformerWatch | None = None
        self._forward_params = list(inspect.signature(transformer.forward).parameters)

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
        """Treat the next transformer call as step 0 of a new run (only needed for a bare transformer when two runs
        of one step follow each other: the step tracker otherwise sees a repeated timestep as a further call)."""
        self._last_raw = None
        self.state = None

    @contextmanager
    def auxiliary(self, branch: str) -> Iterator[None]:
        """Calls inside are extra predictions of the current step in branch `branch` (e.g. 'detail'), for this
        session and every other session on the transformer."""
        if self.state is None or self._watch is None:
            raise DitfError("auxiliary() needs a current step: call it from inside a transformer hook.")
        with self._watch.auxiliary(branch):
            yield

    # ------------------------------------------------------------------ pipeline signals (RunListener)
    def run_started(self, arguments: dict[str, Any], steps_reported: bool) -> None:
        """Called by the pipeline watch when a pipeline call begins (see `ditf.massive.signals`)."""
        self._in_pipeline_run = True
        self._run_pending = True
        self._steps_reported = steps_reported
        self._next_step = 0
        self.run_arguments = arguments
        scale_argument = self.layout.scale_argument
        if self.layout.kind == "none" or scale_argument is None:
            self.cfg_scale, self.cfg_known = None, True
        elif scale_argument in arguments:
            self.cfg_scale, self.cfg_known = self.layout.cfg_scale(arguments), True
        else:
            self.cfg_scale, self.cfg_known = None, False
        guidance = {name: _jsonable(value) for name, value in arguments.items() if "guidance" in name or "cfg" in name}
        self.runs.append({"run": len(self.runs), "guidance_arguments": guidance, "cfg_scale": self.cfg_scale,
                          "unconditional_branch": self.cfg_scale is not None,
                          "steps_from": "callback_on_step_end" if steps_reported else "timesteps"})

    def step_ended(self, index: int) -> None:
        """Called by the pipeline watch at `callback_on_step_end` of step `index`."""
        self._next_step = index + 1

    def run_ended(self) -> None:
        """Called by the pipeline watch when the pipeline call returns or raises."""
        self._in_pipeline_run = False
        self._run_pending = False
        self.run_arguments = None

    def _read_pipeline_cfg(self) -> None:
        """At a run's first transformer call: the pipeline's own `do_classifier_free_guidance` (set by then) overrides
        the arguments when it says no CFG runs (FLUX.2-klein distilled); an unknown CFG scale is read from the
        pipeline's `guidance_scale` state."""
        flag = getattr(self.pipeline, "do_classifier_free_guidance", None)
        if not isinstance(flag, bool):
            return
        if not flag:
            self.cfg_scale, self.cfg_known = None, True
        elif not self.cfg_known:
            state = getattr(self.pipeline, "_guidance_scale", getattr(self.pipeline, "guidance_scale", None))
            if isinstance(state, (int, float)) and not isinstance(state, bool):
                self.cfg_scale, self.cfg_known = float(state), True
        if self.runs:
            self.runs[-1].update(cfg_scale=self.cfg_scale, unconditional_branch=self.cfg_scale is not None)

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> Session:
        try:
            sampler = self.pipeline if getattr(self.pipeline, "scheduler", None) is not None else None
            self._watch = self._contexts.enter_context(watching(self.transformer, sampler, self))
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
        if exc_type is not None:
            for action in self._all_actions:
                action.abandon()
            return
        try:
            for action in self._all_actions:
                action.finish(self)
        except BaseException:
            for action in self._all_actions:
                action.abandon()
            raise

    def _install(self) -> None:
        self._handles.append(self.transformer.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.transformer.register_forward_hook(self._end_call, with_kwargs=True, always_call=True))
        self._output_actions = [action for action in self._all_actions if action.wants_transformer_output]
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
        """Whether a batched call carries an unconditional half: the run's arguments, else the pipeline's flag, else
        (a documented guess) duplicated latents."""
        if self._mode == "pipeline" and self.cfg_known:
            return self.cfg_scale is not None
        flag = getattr(self.pipeline, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        half = latents.shape[0] // 2
        return latents.shape[0] % 2 == 0 and torch.equal(latents[:half], latents[half:])

    def _rows(self, call: int, batch: int, latents: torch.Tensor, label: tuple[str, str] | None) -> tuple:
        if label is not None and label[1] == PIPELINE_LABEL and self.layout.kind == "sequential":
            name = label[0] if label[0] in ("cond", "uncond") else "extra"
            return ((name, slice(0, batch)),)
        active = self._cfg_active(latents) if self.layout.kind == "batched" else False
        if active and batch % 2:
            raise UnsupportedLayoutError(
                f"a batched-CFG call has an odd batch of {batch} rows, so its [uncond, cond] halves cannot be told apart; "
                "pass cfg_layout= for this pipeline."
            )
        return self.layout.rows(call, batch, active)

    def _begin_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append(self.state)
        batch, latents = self._batch(args, kwargs)
        label = self._watch.label if self._watch is not None else None
        if label is not None and label[1] == DITF_LABEL:
            if self.state is None:
                raise DitfError(f"an auxiliary {label[0]!r} forward ran before any step of this session.")
            self.state = replace(self.state, rows=((label[0], slice(0, batch)),))
            self.branches_seen.add(label[0])
            self.calls += 1
            return None
        mode = "given" if self._override is not None else "pipeline" if self._in_pipeline_run else "timestep"
        fresh = self.state is None or self._mode != mode
        self._mode = mode
        if mode == "given":
            new_run, step, call, t, total = self._position_given(fresh)
        elif mode == "pipeline":
            new_run, step, call, t, total = self._position_in_run(self._raw_timestep(args, kwargs))
        else:
            new_run, step, call, t, total = self._position_from_timestep(fresh, self._raw_timestep(args, kwargs))
        if new_run:
            self._run += 1
        if total is not None and step >= total:
            raise InvalidArgumentError(
                f"the transformer ran a step {step} but the run has only {total} steps; intervene() lost track of the "
                "sampler (were the timesteps not decreasing?)."
            )
        rows = self._rows(call, batch, latents, label)
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

    def _position_in_run(self, raw: float) -> tuple[bool, int, int, float | None, int | None]:
        """(new run?, step, call, t, total) of a call inside a pipeline call: the first call starts the run; the step
        is the pipeline's own (`callback_on_step_end`), else the next one whenever the timestep changes."""
        previous = self.state
        if self._run_pending:
            self._run_pending = False
            self._read_pipeline_cfg()
            new_run, step, call = True, 0, 0
        else:
            if self._steps_reported:
                step = self._next_step
            else:
                step = previous.step if raw == self._last_raw else previous.step + 1
            new_run, call = False, previous.call + 1 if step == previous.step else 0
        self._last_raw = raw
        t, total = self._schedule_position(raw, step)
        return new_run, step, call, t, total

    def _position_from_timestep(self, fresh: bool, raw: float) -> tuple[bool, int, int, float | None, int | None]:
        """(new run?, step, call, t, total) from the timestep the transformer got, outside a pipeline call: a lower
        one is the next step, the same one a further call of this step, a higher one (or the first call) step 0 of
        a new run."""
        previous = self.state
        if fresh or self._last_raw is None or raw > self._last_raw:
            new_run, step, call = True, 0, 0
        elif raw == self._last_raw:
            new_run, step, call = False, previous.step, previous.call + 1
        else:
            new_run, step, call = False, previous.step + 1, 0
        self._last_raw = raw
        t, total = self._schedule_position(raw, step)
        return new_run, step, call, t, total

    def _schedule_position(self, raw: float, step: int) -> tuple[float, int | None]:
        """(t, total steps) of `step`: the scheduler's timestep when the pipeline's schedule covers it, else `raw`."""
        total = self._pipeline_total_steps()
        schedule = self._scheduler_timesteps()
        if total is not None and schedule is not None and len(schedule) >= total and step < total:
            self.time_units = "scheduler"
            return schedule[len(schedule) - total + step], total
        self.time_units = "transformer"
        return raw, total

    def _end_call(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        label = self._watch.label if self._watch is not None else None
        try:
            if output is not None and self.state is not None and (label is None or label[1] != DITF_LABEL):
                for action in self._output_actions:
                    replaced = action.on_transformer_output(self, args, kwargs, output)
                    if replaced is not None:
                        output = replaced
        finally:
            enclosing = self._stack.pop() if self._stack else None
            if self._stack:  # a nested call (e.g. an auxiliary prediction) ended: the enclosing call is current again
                self.state = enclosing
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
