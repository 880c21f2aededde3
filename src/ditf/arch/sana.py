"""Sana (0.6B, 1.6B): `SanaTransformer2DModel` with `SanaPipeline`.

Blocks: one list, `transformer_blocks`; k = 0..19 for Sana-1.6B (k is the position in that list).

z_k (the DiTF tap) is the image-token `hidden_states` block k receives, (B, h*w, C) in row-major token
order. The blocks are called positionally, `block(x, attention_mask, context, context_mask, t6, H, W)`,
so the adapter binds the call to the block's signature instead of reading keyword arguments.
There is no AdaLN module to hook: as in PixArt, the model computes one 6*C vector `t6`
(`time_embed`, an `AdaLayerNormSingle`) shared by all blocks, and block k adds its own
`scale_shift_table` (6, C): rows 0, 1, 2 of `table + t6.view(B, 6, C)` are (shift, scale, gate) of the
self-attention, and the block feeds `(1 + scale) * LayerNorm(z_k) + shift` (eps 1e-6, no affine) to it.
The caption is cross-attention context, not a residual stream, so `BlockInputs.text` is None; blocks
return the image stream alone.

Latents: `AutoencoderDC` (32 channels, 32x downsampling) is deterministic: its encoder returns
`.latent` (no posterior to sample), normalised as `z * scaling_factor` (0.41407 for the released
DC-AE). Patch size 1, so the feature stride is 32 px.

Noise: flow matching (the released scheduler is DPM-Solver with flow sigmas), x_t = s * noise + (1 - s) * x0
with s = t / 1000; the transformer's `timestep` argument is s * 1000 * `config.timestep_scale`, as in
`SanaPipeline`. Prompts go through Gemma-2 with an attention mask, prefixed by the pipeline's own
"complex human instruction" (its `__call__` default), 300 tokens kept. Sana-Sprint checkpoints
(`guidance_embeds=True`) use SCM timesteps and are refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ditf.arch.base import (
    BATCHED_CFG_UNCOND_FIRST,
    ArchSpec,
    BlockInputs,
    BlockRef,
    Conditioning,
    adaln_single_modulation,
    expand_batch,
    text_prompt,
)
from ditf.errors import UnsupportedLayoutError

MAX_PROMPT_TOKENS = 300
"""`max_sequence_length` SanaPipeline encodes prompts with (its default)."""


class SanaArch(ArchSpec):
    family = "sana"
    transformer_classes = ("SanaTransformer2DModel",)
    stages = ("transformer_blocks",)
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                               "timestep", "height", "width"),
    }
    pipeline_class = "SanaPipeline"
    noise_convention = "flow"
    text_limits = {"tokenizer": MAX_PROMPT_TOKENS}
    cfg_layouts = {"SanaPipeline": BATCHED_CFG_UNCOND_FIRST}
    default_vae_sample = "mode"
    """The DC-AE is deterministic: its one latent is the "posterior mode"."""

    def check_layout(self) -> None:
        """Refuse Sana-Sprint (guidance-embedded, SCM timesteps) on top of the signature check."""
        super().check_layout()
        if self.transformer.config.guidance_embeds:
            raise UnsupportedLayoutError(
                "this SanaTransformer2DModel has guidance_embeds=True (Sana-Sprint), which is driven with SCM "
                "timesteps that ditf does not model; use a Sana checkpoint (e.g. sana-1600m)."
            )

    # ------------------------------------------------------------ block taps
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k (B, N, C) and the self-attention (shift, scale, gate), each (B, C), from block k's call."""
        call = _bind(block, args, kwargs)
        image = call["hidden_states"]
        shift, scale, gate = adaln_single_modulation(block.module.scale_shift_table, call["timestep"], image.shape[0])
        return BlockInputs(image, None, shift, scale, gate)

    # ------------------------------------------------------- latents, noise
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (encoder levels - 1) of the attached DC-AE, else Sana's 32."""
        if self.vae is not None and hasattr(self.vae.config, "encoder_block_out_channels"):
            return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)
        return 32

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DC-AE latents (B, c, H, W) -> `latents * scaling_factor`, same shape."""
        return latents * self.vae.config.scaling_factor

    def encode_images(self, pixels: torch.Tensor, num_samples: int | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] -> normalised latents (1, c, H/32, W/32).

        The DC-AE is deterministic, so one latent serves every ensemble member whatever `num_samples`
        asks for, and `generator` is not used.
        """
        return self.normalize_latents(self.vae.encode(pixels).latent)

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Call the transformer on noisy latents (B, c, H, W) at t in 0..1000 (`guidance` is unused)."""
        batch = latents.shape[0]
        timestep = torch.full((batch,), t * self.transformer.config.timestep_scale, device=latents.device,
                              dtype=torch.float32)  # fp32 as SanaPipeline passes it (bf16 would turn 261 into 260)
        return self.transformer(
            latents,
            encoder_hidden_states=expand_batch(cond["prompt_embeds"], batch).to(latents),
            encoder_attention_mask=expand_batch(cond["prompt_attention_mask"], batch).to(latents.device),
            timestep=timestep,
            return_dict=False,
        )

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """Gemma embeddings (B, 300, 2304) and their attention mask (B, 300)."""
        return ("prompt_embeds", "prompt_attention_mask")

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """Encode `prompt` as `SanaPipeline.__call__` does: with its complex human instruction, 300 tokens."""
        prompt = text_prompt(prompt, "Sana")
        instruction = inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default
        embeds, mask, _, _ = pipeline.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=device, complex_human_instruction=instruction,
            max_sequence_length=MAX_PROMPT_TOKENS,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _bind(block: BlockRef, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Block k's call arguments by parameter name, however they were passed."""
    return inspect.signature(block.module.forward).bind(*args, **kwargs).arguments
