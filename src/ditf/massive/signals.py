"""What a diffusers pipeline says about where sampling is, shared by every `intervene` session on a model.

- A pipeline call (`pipe(...)`) is one run. For as long as a session watches the pipeline, the pipeline's class is
  a subclass of its own (the technique of `torch.nn.utils.parametrize`) whose `__call__` tells the listeners the
  call's arguments (defaults filled in) before it runs, and chains a `callback_on_step_end` that reports the end of
  every denoising step with the pipeline's own step index. `isinstance` and the class name are unchanged.
- `transformer.cache_context(name)`, which diffusers' sequential-CFG pipelines (FLUX.1, Qwen-Image, FLUX.2-klein)
  hold around their conditional and unconditional calls, names the branch of the calls inside it.
- `auxiliary(name)` is ditf's own label for extra forwards (Detail Guidance's `detail` prediction); every session
  on the transformer sees it, nested ones included.

Each watch is installed once per object, counted, and removed (class and `cache_context` restored) when the last
session on that object ends.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from torch import nn

PIPELINE_LABEL = "pipeline"
"""Source of a label set by the pipeline through `transformer.cache_context`."""
DITF_LABEL = "ditf"
"""Source of a label set by ditf (`TransformerWatch.auxiliary`)."""


class RunListener(Protocol):
    """Receives a watched pipeline's runs and step ends."""

    def run_started(self, arguments: dict[str, Any], steps_reported: bool) -> None:
        """A pipeline call begins with `arguments` (every `__call__` parameter, defaults filled in);
        `steps_reported`: whether `step_ended` will be called at the end of every step."""

    def step_ended(self, index: int) -> None:
        """The pipeline finished denoising step `index` (its `callback_on_step_end` index)."""

    def run_ended(self) -> None:
        """The pipeline call returned or raised."""


class TransformerWatch:
    """Branch labels of the transformer calls: the pipeline's `cache_context` names and ditf's auxiliary labels."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.labels: list[tuple[str, str]] = []
        """Stack of (name, source) labels, innermost last; source is `PIPELINE_LABEL` or `DITF_LABEL`."""
        self._wrapped = False

    @property
    def label(self) -> tuple[str, str] | None:
        """The innermost label, or None when no label is set."""
        return self.labels[-1] if self.labels else None

    @contextmanager
    def auxiliary(self, name: str) -> Iterator[None]:
        """Transformer calls inside are extra predictions labelled `name` (e.g. 'detail') for every session."""
        self.labels.append((name, DITF_LABEL))
        try:
            yield
        finally:
            self.labels.pop()

    def install(self) -> None:
        original = getattr(self.transformer, "cache_context", None)
        if original is None or "cache_context" in vars(self.transformer):
            return
        labels = self.labels

        @contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            labels.append((name, PIPELINE_LABEL))
            try:
                with original(name, **kwargs):
                    yield
            finally:
                labels.pop()

        self.transformer.cache_context = cache_context
        self._wrapped = True

    def remove(self) -> None:
        if self._wrapped:
            del self.transformer.cache_context
            self._wrapped = False


class PipelineWatch:
    """Runs and step ends of one pipeline object, reported to the subscribed listeners."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.original_class = type(pipeline)
        self.listeners: list[RunListener] = []
        self._watched_class: type | None = None

    def install(self) -> None:
        original = self.original_class
        call = getattr(original, "__call__", None)
        if call is None or not callable(call):
            return
        try:
            signature = inspect.signature(call)
        except (TypeError, ValueError):
            return
        watch = self

        @functools.wraps(call)
        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            return watch.run(call, signature, pipe, args, kwargs)

        self._watched_class = type(original.__name__, (original,), {
            "__call__": __call__, "__module__": original.__module__, "__qualname__": original.__qualname__,
            "__doc__": original.__doc__})  # fmt: skip
        self.pipeline.__class__ = self._watched_class

    def remove(self) -> None:
        if self._watched_class is not None and type(self.pipeline) is self._watched_class:
            self.pipeline.__class__ = self.original_class
        self._watched_class = None

    def run(self, call: Callable[..., Any], signature: inspect.Signature, pipe: Any, args: tuple,
            kwargs: dict[str, Any]) -> Any:
        """Run the pipeline's own `__call__`, telling the listeners where it is."""
        given = signature.bind(pipe, *args, **kwargs)
        complete = signature.bind(pipe, *args, **kwargs)
        complete.apply_defaults()
        arguments = call_arguments(signature, complete.arguments)
        reported = "callback_on_step_end" in signature.parameters
        if reported:
            user = given.arguments.get("callback_on_step_end")
            given.arguments["callback_on_step_end"] = self._step_callback(user)
            inputs = getattr(user, "tensor_inputs", None)
            if inputs is not None and "callback_on_step_end_tensor_inputs" in signature.parameters:
                given.arguments["callback_on_step_end_tensor_inputs"] = list(inputs)
        listeners = list(self.listeners)
        try:
            for listener in listeners:
                listener.run_started(arguments, reported)
            return call(*given.args, **given.kwargs)
        finally:
            for listener in listeners:
                listener.run_ended()

    def _step_callback(self, user: Callable[..., Any] | None) -> Callable[..., Any]:
        listeners = list(self.listeners)

        def step_ended(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            for listener in listeners:
                listener.step_ended(int(index))
            return user(pipe, index, timestep, tensors) if user is not None else {}

        return step_ended


def call_arguments(signature: inspect.Signature, bound: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name, without `self`, with `**kwargs` merged in."""
    arguments: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif name != "self":
            arguments[name] = value
    return arguments


_TRANSFORMERS: dict[int, tuple[TransformerWatch, int]] = {}
_PIPELINES: dict[int, tuple[PipelineWatch, int]] = {}


@contextmanager
def watching(transformer: nn.Module, pipeline: Any = None,
             listener: RunListener | None = None) -> Iterator[TransformerWatch]:
    """Watch `transformer` (and `pipeline`, reporting its runs to `listener`) inside the block; yield the
    transformer's watch. Watches are shared by nested sessions and removed with the last of them."""
    transformer_watch = _acquire(_TRANSFORMERS, transformer, TransformerWatch)
    pipeline_watch = None
    try:
        if pipeline is not None:
            pipeline_watch = _acquire(_PIPELINES, pipeline, PipelineWatch)
            if listener is not None:
                pipeline_watch.listeners.append(listener)
        yield transformer_watch
    finally:
        if pipeline_watch is not None:
            if listener is not None:
                pipeline_watch.listeners.remove(listener)
            _release(_PIPELINES, pipeline)
        _release(_TRANSFORMERS, transformer)


def _acquire(registry: dict[int, tuple[Any, int]], target: Any, kind: type) -> Any:
    key = id(target)
    if key in registry:
        watch, count = registry[key]
        registry[key] = (watch, count + 1)
        return watch
    watch = kind(target)
    watch.install()
    registry[key] = (watch, 1)
    return watch


def _release(registry: dict[int, tuple[Any, int]], target: Any) -> None:
    key = id(target)
    watch, count = registry[key]
    if count > 1:
        registry[key] = (watch, count - 1)
        return
    del registry[key]
    watch.remove()


__all__ = ["DITF_LABEL", "PIPELINE_LABEL", "PipelineWatch", "RunListener", "TransformerWatch", "call_arguments",
           "watching"]
