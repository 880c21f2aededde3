"""Activation transport (Turri et al. 2026): write a source trajectory's residual stream into a target's.

At every chosen block and step, the target image stream X_t (B, N, C) becomes
    X_t <- X_t * (1 - M) + X_s * M,   M = p m^T,
with X_s the source's stream at the same block, step and branch, p (N,) a spatial token mask and
m (C,) a channel mask. The paper gives M as a hard 0/1 mask (entries are then copied exactly);
a float p in [0, 1] blends softly (our extension, not in the paper).

Left open by the paper (so parameters here, never hidden defaults): which blocks and steps, k, whether
p and m come from the source or the target, whether they are recomputed per block and step (here: yes,
on the activations of that very block call), and how a reference image is injected (here: its latents
noised to each timestep of the target's schedule with a seeded noise draw, run through the
transformer with `source_prompt`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ditf.errors import InvalidArgumentError
from ditf.massive.actions import BlockCall, CallState, ScopedAction
from ditf.massive.channels import AllChannels, ChannelSpec, parse_channels
from ditf.massive.clustering import cluster_massive_tokens
from ditf.massive.record import Record, Recording
from ditf.massive.scopes import BlockSpec, Steps, StepSpec
from ditf.massive.session import Session, intervene

SOURCE_BRANCH = {"detail": "cond"}
"""Target branch -> source branch read for it: Detail Guidance's extra prediction is a variant of the
conditional one, so it receives the source's conditional stream."""

Spatial = None | torch.Tensor | Literal["cluster"]
"""None (every token), an (h, w) bool or float mask on the token grid, or 'cluster' (K-means on the MA channels)."""


class Transport(ScopedAction):
    """Transplant the image stream of a recorded source trajectory into the running one.

    source: a `Recording` holding whole `image` tensors at every block and step in scope, for the
    branches in scope (`record_trajectory` makes one). channels: the channel set m ('auto' = the
    massive channels of the block call, 'all', a list, ... see `parse_channels`; None = all).
    spatial: p (see `Spatial`); with 'cluster', p is the foreground cluster of K-means
    (`num_clusters`, `seed`) over the tokens restricted to m. mask_from: whose activations define m
    and a clustered p, 'source' or 'target'.
    """

    def __init__(self, source: Recording, *, channels: ChannelSpec | None = "auto", spatial: Spatial = None,
                 blocks: BlockSpec = "all", steps: StepSpec = "all", branch: str | Iterable[str] = "all",
                 mask_from: Literal["source", "target"] = "source", num_clusters: int = 2, seed: int = 0):
        super().__init__(blocks=blocks, steps=steps, branch=branch)
        if not isinstance(source, Recording):
            raise InvalidArgumentError(
                f"source must be a Recording with whole image tensors (from record_trajectory); got {type(source).__name__}."
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
        self.channels = AllChannels() if channels is None else parse_channels(channels)
        self.spatial = spatial
        self.mask_from = mask_from
        self.num_clusters = num_clusters
        self.seed = seed

    def bind(self, session: Session) -> None:
        super().bind(session)
        self._session = session
        missing = sorted(set(self.blocks) - set(self.source.blocks))
        if missing:
            raise InvalidArgumentError(
                f"the transport source has no image tensors at blocks {missing} (it has blocks "
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

    def _spatial_weights(self, reference: torch.Tensor, channels: list[int]) -> torch.Tensor | None:
        """p for each row of `reference` (B, N, C): (B, N) bool/float, or None for every token."""
        batch, num_tokens, _ = reference.shape
        if self.spatial is None:
            return None
        if isinstance(self.spatial, torch.Tensor):
            if self.spatial.numel() != num_tokens:
                raise InvalidArgumentError(
                    f"spatial mask of shape {tuple(self.spatial.shape)} covers {self.spatial.numel()} tokens but the "
                    f"image stream has {num_tokens}; build the mask on this resolution's token grid."
                )
            return self.spatial.reshape(1, num_tokens).expand(batch, num_tokens).to(reference.device)
        if not channels:
            raise InvalidArgumentError(
                "spatial='cluster' needs massive channels to cluster on, but none were selected at this block; "
                "pass explicit channels or a lower detection threshold."
            )
        masks = [
            cluster_massive_tokens(reference[row].float(), channels, (1, num_tokens), num_clusters=self.num_clusters,
                                   seed=self.seed).mask.reshape(num_tokens)
            for row in range(batch)
        ]  # fmt: skip
        return torch.stack(masks).to(reference.device)

    def on_block_input(self, call: BlockCall) -> None:
        state = call.state
        block = call.block.index
        for branch, rows in state.rows_in(self.branches):
            target = call.image[rows]
            source = self.source.tensor("image", block, state.step, SOURCE_BRANCH.get(branch, branch))
            if source.shape != target.shape:
                raise InvalidArgumentError(
                    f"transport at block {block}, step {state.step}, branch {branch!r}: the source image stream has "
                    f"shape {tuple(source.shape)} but the target's is {tuple(target.shape)} (batch, tokens, channels). "
                    "Generate both trajectories at the same height, width and number of images."
                )
            source_t = self.source.timesteps.get(state.step)
            comparable = self.source.meta.get("time_units") == "scheduler" == self._session.time_units
            if (comparable and source_t is not None and state.t is not None
                    and not math.isclose(source_t, state.t, rel_tol=1e-4, abs_tol=1e-3)):
                raise InvalidArgumentError(
                    f"transport at step {state.step}: the source was recorded at t={source_t:g} but the target runs at "
                    f"t={state.t:g}; record the source along the same schedule (same steps, size and scheduler)."
                )
            source = source.to(target.device, target.dtype)
            reference = source if self.mask_from == "source" else target
            channels = self.channels.select(reference)
            spatial = self._spatial_weights(reference, channels)
            channel_mask = torch.zeros(target.shape[-1], dtype=torch.bool, device=target.device)
            channel_mask[channels] = True
            if spatial is None:
                spatial = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
            self.mark(state, {"block": block, "step": state.step, "branch": branch, "channels": channels,
                              "spatial_fraction": float(spatial.float().mean())})  # fmt: skip
            if spatial.dtype == torch.bool:
                mask = spatial[:, :, None] & channel_mask[None, None, :]
                call.write("image", rows, torch.where(mask, source, target))
            else:
                weight = (spatial[:, :, None].float() * channel_mask[None, None, :].float()).to(target.dtype)
                call.write("image", rows, target * (1 - weight) + source * weight)

    def describe(self) -> dict[str, Any]:
        spatial = self.spatial if isinstance(self.spatial, str) or self.spatial is None else {
            "mask": list(self.spatial.shape), "dtype": str(self.spatial.dtype).replace("torch.", "")}
        return {"action": "Transport", "channels": self.channels.describe(), "spatial": spatial,
                "mask_from": self.mask_from, "num_clusters": self.num_clusters, "seed": self.seed,
                "source": self.source.meta.get("source"), **self.scope(), "applied": self.applied, "log": self.log}


# ------------------------------------------------------------------------------------------- recording sources


def seeded(pipe_kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """`pipe_kwargs` with a fresh CPU generator seeded with `seed` (the same noise for every trajectory)."""
    if "generator" in pipe_kwargs or "latents" in pipe_kwargs:
        raise InvalidArgumentError("pass `seed` instead of generator= / latents=: both trajectories must start from the same noise.")
    return {**pipe_kwargs, "generator": torch.Generator().manual_seed(int(seed))}


def record_trajectory(pipe: Any, prompt: str, *, blocks: BlockSpec, steps: StepSpec = "all", seed: int = 0,
                      branch: str | Iterable[str] = "all", **pipe_kwargs: Any) -> tuple[Any, Recording]:
    """Run `pipe(prompt, ...)` and keep its whole image stream at `blocks` x `steps` (a transport source).

    Returns (the pipeline's output, the Recording). Memory: B x N x C values per block and step.
    """
    record = Record(points=("image",), blocks=blocks, steps=steps, branch=branch, full=True, stats=False)
    with intervene(pipe, [record]):
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    record.recording.meta["source"] = {"kind": "prompt", "prompt": prompt, "seed": seed}
    return output, record.recording


def pipeline_schedule(pipe: Any, prompt: str, *, seed: int = 0, **pipe_kwargs: Any) -> tuple[Any, list[float]]:
    """Run the pipeline once unchanged; return (its output, the scheduler timesteps of every step, 0..1000)."""
    with intervene(pipe, []) as session:
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    if session.time_units != "scheduler":
        raise InvalidArgumentError(f"{type(pipe).__name__} exposes no scheduler timesteps; cannot follow its schedule.")
    return output, [session.timesteps[step] for step in sorted(session.timesteps)]


def record_image_trajectory(pipe: Any, image: Any, timesteps: Sequence[float], *, blocks: BlockSpec,
                            steps: StepSpec = "all", size: tuple[int, int], source_prompt: str = "", seed: int = 0,
                            guidance: float | None = None, progress: bool = True) -> Recording:
    """The image stream of a reference image noised along a schedule: the source of subject-driven transport.

    For every step i of `timesteps` (0..1000, e.g. from `pipeline_schedule`), the image's VAE latents
    (posterior mode) are noised to timesteps[i] with one seeded noise draw (the family's convention)
    and run through the transformer with `source_prompt`; the image stream entering `blocks` is kept.
    size: (height, width) in pixels, the target's image size.
    """
    from ditf.features.featurizer import DiTFeaturizer

    featurizer = DiTFeaturizer(pipe.transformer, pipe.vae, pipeline=pipe)
    settings = featurizer.settings(block=0, t=0, ensemble=1, size=size, seed=seed, prompt=source_prompt,
                                   guidance=guidance, vae_sample="mode")
    latents = featurizer.noisy_latents(image, settings)
    cond = featurizer.conditioning(source_prompt)
    wanted = Steps.parse(steps)
    record = Record(points=("image",), blocks=blocks, steps=steps, branch="cond", full=True, stats=False)
    with intervene(pipe.transformer, [record]) as session:
        for step, t in enumerate(tqdm(list(timesteps), desc="reference trajectory", unit="step", disable=not progress)):
            if not wanted.contains(step, len(timesteps)):
                continue
            noisy = featurizer.add_noise(latents.clean, latents.noise, float(t))
            with session.at_step(step, t=float(t), total_steps=len(timesteps)):
                featurizer.forward(noisy, float(t), cond, settings.guidance)
    record.recording.meta.update(time_units="scheduler", source={"kind": "image", "prompt": source_prompt, "seed": seed})
    return record.recording


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
                         baseline: bool = True, **pipe_kwargs: Any) -> TransportResult:
    """Text-conditioned transport: generate `prompt` while writing `source_prompt`'s MA channels into it.

    Both trajectories use the same seed and settings. Defaults (auto channels, every token) are ours:
    the paper does not publish its blocks, steps, k or mask policy.
    """
    source_output, recording = record_trajectory(pipe, source_prompt, blocks=blocks, steps=steps, seed=seed, **pipe_kwargs)
    transport = Transport(recording, channels=channels, spatial=spatial, blocks=blocks, steps=steps)
    with intervene(pipe, [transport]) as session:
        output = pipe(prompt=prompt, **seeded(pipe_kwargs, seed))
    reference = pipe(prompt=prompt, **seeded(pipe_kwargs, seed)) if baseline else None
    record = {"preset": "prompt_interpolation", "prompt": prompt, "source_prompt": source_prompt, "seed": seed,
              "interventions": session.describe()}
    return TransportResult(output, reference, source_output, record)


def subject_driven(pipe: Any, prompt: str, reference_image: Any, *, blocks: BlockSpec, steps: StepSpec = "all",
                   channels: ChannelSpec | None = "auto", spatial: Spatial = "cluster", source_prompt: str = "",
                   seed: int = 0, height: int, width: int, guidance: float | None = None, progress: bool = True,
                   **pipe_kwargs: Any) -> TransportResult:
    """Image-conditioned transport: generate `prompt` with the MA channels of `reference_image`'s subject.

    The reference is noised along the target's own schedule (one unchanged target run gives the
    schedule and the baseline) and its foreground (K-means on the MA channels, `spatial='cluster'`)
    is transported into the conditional branch. Our defaults; the paper's are unpublished.
    """
    size_kwargs = {**pipe_kwargs, "height": height, "width": width}
    baseline, timesteps = pipeline_schedule(pipe, prompt, seed=seed, **size_kwargs)
    recording = record_image_trajectory(pipe, reference_image, timesteps, blocks=blocks, steps=steps, size=(height, width),
                                        source_prompt=source_prompt, seed=seed, guidance=guidance, progress=progress)
    transport = Transport(recording, channels=channels, spatial=spatial, blocks=blocks, steps=steps, branch="cond")
    with intervene(pipe, [transport]) as session:
        output = pipe(prompt=prompt, **seeded(size_kwargs, seed))
    record = {"preset": "subject_driven", "prompt": prompt, "source_prompt": source_prompt, "seed": seed,
              "interventions": session.describe()}
    return TransportResult(output, baseline, None, record)


__all__ = [
    "Transport", "TransportResult", "pipeline_schedule", "prompt_interpolation",
    "record_image_trajectory", "record_trajectory", "seeded", "subject_driven",
]
