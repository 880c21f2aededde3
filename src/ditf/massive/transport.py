"""Activation transport (Turri et al. 2026): write a source trajectory's residual stream into a target's.

At every chosen block and step, the target image stream X_t (B, N, C) becomes
    X_t <- X_t * (1 - M) + X_s * M,   M = p m^T,
with X_s the source's stream at the same block, step and branch, p (N,) a spatial token mask and
m (C,) a channel mask. The paper gives M as a hard 0/1 mask (entries are then copied exactly);
a float p in [0, 1] blends softly (our extension, not in the paper).

Left open by the paper (so parameters here, never hidden defaults): which blocks and steps, k, whether
p and m come from the source or the target, whether they are recomputed per block and step (here: yes,
per block call), and how a reference image is injected (here: its latents noised to each timestep of the
target's schedule with a seeded noise draw, run through the transformer with `source_prompt`). By default m is
picked on the source's own stream when the source is recorded, and the source keeps only those channels
(`ditf.massive.sources.TransportSource`); a target-chosen m needs a source of every channel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ditf.errors import InvalidArgumentError
from ditf.massive.actions import BlockCall, CallState, ScopedAction
from ditf.massive.channels import ChannelSpec, parse_channels
from ditf.massive.clustering import cluster_massive_tokens
from ditf.massive.record import WARN_BYTES
from ditf.massive.sampling import seeded
from ditf.massive.scopes import BlockSpec, Steps, StepSpec
from ditf.massive.session import Session, intervene
from ditf.massive.sources import SourceRecord, TransportSource
from ditf.massive.stats import channel_stats

SOURCE_BRANCH = {"detail": "cond", "extra": "cond"}
"""Target branch -> source branch read for it: Detail Guidance's extra prediction is a variant of the
conditional one, so it receives the source's conditional stream."""

Spatial = None | torch.Tensor | Literal["cluster"]
"""None (every token), an (h, w) bool or float mask on the token grid, or 'cluster' (K-means on the MA channels)."""


class Transport(ScopedAction):
    """Transplant the image stream of a recorded source trajectory into the running one.

    source: a `TransportSource` covering every block, step and branch in scope (`record_trajectory` makes one).
    channels: None (default) uses the channel set m kept in the source at each cell (picked on the source's
    stream when it was recorded); a selector or spec (`parse_channels`) picks m per call on the `mask_from`
    stream instead and needs a complete source (`record_trajectory(..., channels=None)`).
    spatial: p (see `Spatial`); with 'cluster', p is the foreground cluster of K-means (`num_clusters`, `seed`)
    over the tokens restricted to m, on min-max normalised magnitudes |x| (`signed=True`: signed values).
    mask_from: whose activations define a chosen m and a clustered p, 'source' or 'target'.
    """

    def __init__(self, source: TransportSource, *, channels: ChannelSpec | None = None, spatial: Spatial = None,
                 blocks: BlockSpec = "all", steps: StepSpec = "all", branch: str | Iterable[str] = "all",
                 mask_from: Literal["source", "target"] = "source", num_clusters: int = 2, seed: int = 0,
                 signed: bool = False):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        if not isinstance(source, TransportSource):
            raise InvalidArgumentError(
                f"source must be a TransportSource (from record_trajectory or TransportSource.open); got "
                f"{type(source).__name__}."
            )
        if mask_from not in ("source", "target"):
            raise InvalidArgumentError(f"mask_from={mask_from!r}; valid: 'source', 'target'.")
        if not (spatial is None or isinstance(spatial, torch.Tensor) or spatial == "cluster"):
            raise InvalidArgumentError(f"spatial={spatial!r}; pass None, an (h, w) mask tensor or 'cluster'.")
        if isinstance(spatial, torch.Tensor) and spatial.ndim != 2:
            raise InvalidArgumentError(f"spatial mask has shape {tuple(spatial.shape)}; pass an (h, w) mask on the token grid.")
        if isinstance(spatial, torch.Tensor) and spatial.dtype != torch.bool and not (
            spatial.is_floating_point() and bool(((spatial >= 0) & (spatial <= 1)).all())
        ):
            raise InvalidArgumentError("a float spatial mask must lie in [0, 1] (1 = take the source); or pass a bool mask.")
        self.source = source
        self.channels = None if channels is None else parse_channels(channels)
        if self.channels is None and mask_from == "target":
            raise InvalidArgumentError(
                "mask_from='target' picks m on the target's stream: pass channels= (e.g. 'auto') and a source of "
                "every channel (record_trajectory(..., channels=None))."
            )
        if self.channels is not None and not source.complete:
            raise InvalidArgumentError(
                f"channels={self.channels.describe()} picks m per call, but this source keeps only its own channel "
                "set m; leave channels=None to use it, or record a source of every channel (channels=None)."
            )
        self.spatial = spatial
        self.mask_from = mask_from
        self.num_clusters = num_clusters
        self.seed = seed
        self.signed = signed

    def bind(self, session: Session) -> None:
        super().bind(session)
        self._session = session
        missing = sorted(set(self.blocks) - set(self.source.blocks))
        if missing:
            raise InvalidArgumentError(
                f"the transport source has no image stream at blocks {missing} (it has blocks "
                f"{self.source.blocks or 'none'}); record the source at every block you transport into."
            )

    def start_run(self, state: CallState) -> None:
        super().start_run(state)
        source_steps = set(self.source.steps)
        if state.total_steps is not None and self.source.timesteps:
            wanted = self.steps.resolved(state.total_steps) or set(range(state.total_steps))
            missing = sorted(wanted - source_steps)
            if missing:
                raise InvalidArgumentError(
                    f"the transport source has no steps {missing} (it has {sorted(source_steps)}); the target runs "
                    f"{state.total_steps} steps. Record the source with the same number of steps, or limit steps=."
                )

    def _spatial_weights(self, reference: torch.Tensor) -> torch.Tensor | None:
        """p for each row of `reference` (B, N, |m|), the stream restricted to m: (B, N) bool/float, or None."""
        batch, num_tokens, kept = reference.shape
        if self.spatial is None:
            return None
        if isinstance(self.spatial, torch.Tensor):
            if self.spatial.numel() != num_tokens:
                raise InvalidArgumentError(
                    f"spatial mask of shape {tuple(self.spatial.shape)} covers {self.spatial.numel()} tokens but the "
                    f"image stream has {num_tokens}; build the mask on this resolution's token grid."
                )
            return self.spatial.reshape(1, num_tokens).expand(batch, num_tokens).to(reference.device)
        if not kept:
            raise InvalidArgumentError(
                "spatial='cluster' needs massive channels to cluster on, but none were selected at this block; "
                "pass explicit channels or a lower detection threshold."
            )
        masks = [
            cluster_massive_tokens(reference[row].float(), list(range(kept)), (1, num_tokens),
                                   num_clusters=self.num_clusters, seed=self.seed, signed=self.signed).mask.reshape(num_tokens)
            for row in range(batch)
        ]  # fmt: skip
        return torch.stack(masks).to(reference.device)

    def _check_schedule(self, state: CallState) -> None:
        source_t = self.source.timesteps.get(state.step)
        comparable = self.source.meta.get("time_units") == "scheduler" == self._session.time_units
        if (comparable and source_t is not None and state.t is not None
                and not math.isclose(source_t, state.t, rel_tol=1e-4, abs_tol=1e-3)):
            raise InvalidArgumentError(
                f"transport at step {state.step}: the source was recorded at t={source_t:g} but the target runs at "
                f"t={state.t:g}; record the source along the same schedule (same steps, size and scheduler)."
            )

    def on_block_input(self, call: BlockCall) -> None:
        state = call.state
        block = call.block.index
        for branch, rows in state.rows_in(self.branches):
            target = call.image[rows]
            source_branch = SOURCE_BRANCH.get(branch, branch)
            kept = self.source.channels(block, state.step, source_branch)
            values = self.source.values(block, state.step, source_branch)
            if values.shape[:2] != target.shape[:2] or self.source.num_channels != target.shape[-1]:
                raise InvalidArgumentError(
                    f"transport at block {block}, step {state.step}, branch {branch!r}: the source image stream has "
                    f"shape {(*values.shape[:2], self.source.num_channels)} but the target's is {tuple(target.shape)} "
                    "(batch, tokens, channels). Generate both trajectories at the same height, width and number of images."
                )
            self._check_schedule(state)
            values = values.to(target.device, target.dtype)
            if self.channels is None:
                channels, source_part = kept, values
            else:
                picked_on = values if self.mask_from == "source" else target
                stats = channel_stats(picked_on) if self.channels.needs_statistics else None
                channels = self.channels.select(target.shape[-1], stats)
                source_part = values[..., channels]
            target_part = target[..., channels]
            spatial = self._spatial_weights(source_part if self.mask_from == "source" else target_part)
            if spatial is None:
                spatial = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
            self.mark(state, {"block": block, "step": state.step, "branch": branch, "channels": channels,
                              "spatial_fraction": float(spatial.float().mean())})  # fmt: skip
            if spatial.dtype == torch.bool:
                mixed = torch.where(spatial[:, :, None], source_part, target_part)
            else:
                weight = spatial[:, :, None].to(target.dtype)
                mixed = target_part * (1 - weight) + source_part * weight
            new = target.clone()
            new[..., channels] = mixed
            call.write("image", rows, new)

    def describe(self) -> dict[str, Any]:
        spatial = self.spatial if isinstance(self.spatial, str) or self.spatial is None else {
            "mask": list(self.spatial.shape), "dtype": str(self.spatial.dtype).replace("torch.", "")}
        return {"action": "Transport", "channels": {"selector": "source"} if self.channels is None else self.channels.describe(),
                "spatial": spatial, "signed_clustering": self.signed, "mask_from": self.mask_from,
                "num_clusters": self.num_clusters, "seed": self.seed, "source": self.source.describe(),
                **self.scope(), "applied": self.applied, "log": self.log}


# ------------------------------------------------------------------------------------------- recording sources


def record_trajectory(pipe: Any, prompt: str, *, blocks: BlockSpec, steps: StepSpec = "all", seed: int = 0,
                      branch: str | Iterable[str] = "all", channels: ChannelSpec | None = "auto",
                      store: str | os.PathLike[str] | None = None, warn_bytes: float = WARN_BYTES,
                      **pipe_kwargs: Any) -> tuple[Any, TransportSource]:
    """Run `pipe(prompt, ...)` and keep its image stream at `blocks` x `steps`: a transport source.

    channels: the channel set m picked per call on this (unmodified) trajectory ('auto', a list, ...; None keeps
    every channel, needed only for a target-chosen m). store: None (memory) or a `.safetensors` path. warn_bytes:
    warn with the estimated size before keeping every channel above this many bytes. Returns (the pipeline's
    output, the `TransportSource`). Memory: B x N x |m| values per block, step and branch.
    """
    record = SourceRecord(channels, blocks=blocks, steps=steps, branch=branch, store=store, warn_bytes=warn_bytes,
                          meta={"source": {"kind": "prompt", "prompt": prompt, "seed": seed}})
    with intervene(pipe, [record]):
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    return output, record.source


def pipeline_schedule(pipe: Any, prompt: str, *, seed: int = 0, **pipe_kwargs: Any) -> tuple[Any, list[float]]:
    """Run the pipeline once unchanged; return (its output, the scheduler timesteps of every step, 0..1000)."""
    with intervene(pipe, []) as session:
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    if session.time_units != "scheduler":
        raise InvalidArgumentError(f"{type(pipe).__name__} exposes no scheduler timesteps; cannot follow its schedule.")
    return output, [session.timesteps[step] for step in sorted(session.timesteps)]


def record_image_trajectory(pipe: Any, image: Any, timesteps: Sequence[float], *, blocks: BlockSpec,
                            steps: StepSpec = "all", size: tuple[int, int], source_prompt: str = "", seed: int = 0,
                            guidance: float | None = None, channels: ChannelSpec | None = "auto",
                            store: str | os.PathLike[str] | None = None, progress: bool = True) -> TransportSource:
    """The image stream of a reference image noised along a schedule: the source of subject-driven transport.

    For every step i of `timesteps` (0..1000, e.g. from `pipeline_schedule`), the image's VAE latents
    (posterior mode) are noised to timesteps[i] with one seeded noise draw (the family's convention)
    and run through the transformer with `source_prompt`; the image stream entering `blocks` is kept on the
    channels `channels` picks (see `record_trajectory`). size: (height, width) in pixels, the target's image size.
    """
    from ditf.features.featurizer import DiTFeaturizer

    featurizer = DiTFeaturizer(pipe.transformer, pipe.vae, pipeline=pipe)
    settings = featurizer.settings(block=0, t=0, ensemble=1, size=size, seed=seed, prompt=source_prompt,
                                   guidance=guidance, vae_sample="mode")
    latents = featurizer.noisy_latents(image, settings)
    cond = featurizer.conditioning(source_prompt)
    wanted = Steps.parse(steps)
    record = SourceRecord(channels, blocks=blocks, steps=steps, branch="cond", store=store, meta={
        "time_units": "scheduler", "source": {"kind": "image", "prompt": source_prompt, "seed": seed}})
    with intervene(pipe.transformer, [record]) as session:
        for step, t in enumerate(tqdm(list(timesteps), desc="reference trajectory", unit="step", disable=not progress)):
            if not wanted.contains(step, len(timesteps)):
                continue
            noisy = featurizer.add_noise(latents.clean, latents.noise, float(t))
            with session.at_step(step, t=float(t), total_steps=len(timesteps)):
                featurizer.forward(noisy, float(t), cond, settings.guidance)
    return record.source


# ------------------------------------------------------------------------------------------- presets


@dataclass
class TransportResult:
    """Output of a transport preset: the transported image, its reference images and the actions' record."""

    output: Any
    baseline: Any | None
    source: Any | None
    record: dict[str, Any] = field(default_factory=dict)


def prompt_interpolation(pipe: Any, prompt: str, source_prompt: str, *, blocks: BlockSpec, steps: StepSpec = "all",
                         channels: ChannelSpec | None = "auto", spatial: Spatial = None, seed: int = 0,
                         baseline: bool = True, signed: bool = False, **pipe_kwargs: Any) -> TransportResult:
    """Text-conditioned transport: generate `prompt` while writing `source_prompt`'s MA channels into it.

    Both trajectories use the same seed and settings; m is picked on the source's stream (`channels`). Defaults
    (auto channels, every token) are ours: the paper does not publish its blocks, steps, k or mask policy.
    """
    source_output, source = record_trajectory(pipe, source_prompt, blocks=blocks, steps=steps, seed=seed,
                                              channels=channels, **pipe_kwargs)
    transport = Transport(source, spatial=spatial, blocks=blocks, steps=steps, signed=signed)
    with intervene(pipe, [transport]) as session:
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    reference = pipe(prompt=prompt, **seeded(pipe_kwargs, seed)) if baseline else None
    record = {"preset": "prompt_interpolation", "prompt": prompt, "source_prompt": source_prompt, "seed": seed,
              "interventions": session.describe()}
    return TransportResult(output, reference, source_output, record)


def subject_driven(pipe: Any, prompt: str, reference_image: Any, *, blocks: BlockSpec, steps: StepSpec = "all",
                   channels: ChannelSpec | None = "auto", spatial: Spatial = "cluster", source_prompt: str = "",
                   seed: int = 0, height: int, width: int, guidance: float | None = None, progress: bool = True,
                   signed: bool = False, **pipe_kwargs: Any) -> TransportResult:
    """Image-conditioned transport: generate `prompt` with the MA channels of `reference_image`'s subject.

    The reference is noised along the target's own schedule (one unchanged target run gives the
    schedule and the baseline) and its foreground (K-means on the MA channels, `spatial='cluster'`)
    is transported into the conditional branch. Our defaults; the paper's are unpublished.
    """
    size_kwargs = {**pipe_kwargs, "height": height, "width": width}
    baseline, timesteps = pipeline_schedule(pipe, prompt, seed=seed, **size_kwargs)
    source = record_image_trajectory(pipe, reference_image, timesteps, blocks=blocks, steps=steps, size=(height, width),
                                     source_prompt=source_prompt, seed=seed, guidance=guidance, channels=channels,
                                     progress=progress)
    transport = Transport(source, spatial=spatial, blocks=blocks, steps=steps, branch="cond", signed=signed)
    with intervene(pipe, [transport]) as session:
        output = pipe(prompt=prompt, **seeded(size_kwargs, seed))
    record = {"preset": "subject_driven", "prompt": prompt, "source_prompt": source_prompt, "seed": seed,
              "interventions": session.describe()}
    return TransportResult(output, baseline, None, record)


__all__ = [
    "Transport", "TransportResult", "pipeline_schedule", "prompt_interpolation",
    "record_image_trajectory", "record_trajectory", "subject_driven",
]
