"""Every family's tiny pipeline and the facts the shared adapter tests (`test_arch_common.py`) check it against.

One `TinyFamily` row per tested model: how to build it, its block lists, width and stride, the image the
tests feed it, which block submodule receives `(1 + scale) * LayerNorm(z_k) + shift`, which module emits
the image stream (to inject massive channels into), and the family's own scheduler as the reference for
noising. Adding a family (or a variant of one) to the shared tests is adding a row to `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tiny_dit
import tiny_flux2
import tiny_pixart
import tiny_qwen_image
import tiny_sana
import tiny_sd3
from tiny_models import PROMPT, flux_pipeline

NoisedReference = Callable[[Mapping[str, Any], torch.Tensor, torch.Tensor], tuple[list[tuple[float, torch.Tensor]], float]]
"""(scheduler config, x0, noise), both (1, c, H, W) -> ([(t in 0..1000, x_t by the scheduler)], absolute tolerance)."""


def ddpm_add_noise(config: Mapping[str, Any], x0: torch.Tensor, noise: torch.Tensor):
    """x_t from `DDPMScheduler.add_noise` at integer timesteps 1, 261, 999: ditf noises with the pipeline's own
    schedule, so exactly."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(config)
    return [(float(t), scheduler.add_noise(x0, noise, torch.tensor([t]))) for t in (1, 261, 999)], 0.0


def flow_match_scale_noise(config: Mapping[str, Any], x0: torch.Tensor, noise: torch.Tensor):
    """x_t from `FlowMatchEulerDiscreteScheduler.scale_noise` at three of its (shifted) sampling timesteps t,
    where sigma is t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(10, mu=0.8 if scheduler.config.use_dynamic_shifting else None)
    return [(float(t), scheduler.scale_noise(x0, t[None], noise)) for t in scheduler.timesteps[[1, 5, 9]]], 1e-6


def flow_dpm_add_noise(config: Mapping[str, Any], x0: torch.Tensor, noise: torch.Tensor):
    """x_t from DPM-Solver-with-flow-sigmas' `add_noise` at three of its steps; ditf's t is 1000 * sigma of the step."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(config)
    scheduler.set_timesteps(10)
    return [(1000 * float(scheduler.sigmas[step]), scheduler.add_noise(x0, noise, scheduler.timesteps[step:step + 1]))
            for step in (1, 5, 9)], 1e-6


@dataclass(frozen=True)
class TinyFamily:
    """One tested model: a tiny pipeline builder with its variant options, and what the adapter must report."""

    name: str
    """Test id, e.g. `sd3.5`."""
    builder: Callable[..., Path]
    """`builder(folder, **variant)` saves the pipeline to `folder` and returns it."""
    variant: dict[str, Any]
    blocks: dict[str, int]
    """Block lists of the transformer in execution order, and their lengths."""
    width: int
    """Residual-stream channels C."""
    embedder: str
    """Transformer submodule whose output (B, N, C) is the image stream entering block 0."""
    noised_by: NoisedReference
    """The family's scheduler as the reference for `ArchSpec.noise_latents`."""
    stride: int = 16
    """Pixels per feature cell."""
    image: tuple[int, int] = (64, 48)
    """(H, W) px of the test images."""
    grid: tuple[int, int] = (4, 3)
    """(h, w) feature cells of `image` at resolution `stride * max(grid)`."""
    prompt: str | int = PROMPT
    attention: str = "attn"
    """Block submodule whose input `hidden_states` ends with the block's modulated image tokens."""
    massive: tuple[int, ...] = (3, 7)
    """Channels the tests make massive in the image stream (FLUX's reference weights have 11 and 42 already)."""
    text: bool = True
    """Whether prompts are text (DiT takes class labels)."""

    def build(self, folder: Path) -> Path:
        """Save this family's tiny pipeline to `folder`."""
        return self.builder(folder, **self.variant)

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks.values())

    @property
    def resolution(self) -> int:
        """Long side of the test images after resizing, in px."""
        return self.stride * max(self.grid)


FLUX_TINY_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 10}
"""Block lists of the flux_tiny fixture transformer (FLUX.1-dev's 19 + 10 blocks, width 64)."""
FLUX2_BLOCKS = {"transformer_blocks": tiny_flux2.NUM_DOUBLE, "single_transformer_blocks": tiny_flux2.NUM_SINGLE}

FAMILY_LIST = [
    TinyFamily("flux", flux_pipeline, {}, FLUX_TINY_BLOCKS, width=64, embedder="x_embedder",
               noised_by=flow_match_scale_noise, image=(70, 100), grid=(6, 8), massive=(11, 42)),
    TinyFamily("sd3", tiny_sd3.build_sd3_pipeline, {}, {"transformer_blocks": tiny_sd3.NUM_LAYERS}, tiny_sd3.WIDTH,
               embedder="pos_embed", noised_by=flow_match_scale_noise),
    TinyFamily("sd3.5", tiny_sd3.build_sd3_pipeline, {"sd35": True}, {"transformer_blocks": tiny_sd3.NUM_LAYERS},
               tiny_sd3.WIDTH, embedder="pos_embed", noised_by=flow_match_scale_noise),
    TinyFamily("pixart-alpha", tiny_pixart.build_pixart_pipeline, {}, {"transformer_blocks": tiny_pixart.NUM_LAYERS},
               tiny_pixart.WIDTH, embedder="pos_embed", noised_by=ddpm_add_noise, attention="attn1"),
    TinyFamily("pixart-sigma", tiny_pixart.build_pixart_pipeline, {"sigma": True},
               {"transformer_blocks": tiny_pixart.NUM_LAYERS}, tiny_pixart.WIDTH, embedder="pos_embed",
               noised_by=ddpm_add_noise, attention="attn1"),
    TinyFamily("dit", tiny_dit.build_dit_pipeline, {}, {"transformer_blocks": tiny_dit.NUM_LAYERS}, tiny_dit.WIDTH,
               embedder="pos_embed", noised_by=ddpm_add_noise, image=(64, 64), grid=(4, 4), prompt=2,
               attention="attn1", text=False),
    TinyFamily("sana", tiny_sana.build_sana_pipeline, {}, {"transformer_blocks": tiny_sana.NUM_LAYERS}, tiny_sana.WIDTH,
               embedder="patch_embed", noised_by=flow_dpm_add_noise, stride=32, image=(128, 96), attention="attn1"),
    TinyFamily("qwen-image", tiny_qwen_image.build_qwen_image_pipeline, {},
               {"transformer_blocks": tiny_qwen_image.NUM_LAYERS}, tiny_qwen_image.WIDTH, embedder="img_in",
               noised_by=flow_match_scale_noise),
    TinyFamily("flux2-klein", tiny_flux2.build_flux2_pipeline, {"variant": "klein"}, FLUX2_BLOCKS, tiny_flux2.WIDTH,
               embedder="x_embedder", noised_by=flow_match_scale_noise),
    TinyFamily("flux2-dev", tiny_flux2.build_flux2_pipeline, {"variant": "dev"}, FLUX2_BLOCKS, tiny_flux2.WIDTH,
               embedder="x_embedder", noised_by=flow_match_scale_noise),
]
FAMILIES = {family.name: family for family in FAMILY_LIST}
"""The rows by name."""
