"""Stable Diffusion 3 / 3.5 (medium, large): `SD3Transformer2DModel` (MMDiT).

Blocks: one list, `transformer_blocks` (`JointTransformerBlock`), so k is the list index: SD3-medium
and SD3.5-medium have k = 0..23, SD3.5-large k = 0..37. The last block is `context_pre_only` (its text
side has no MLP and a continuous AdaLN); its image side is an ordinary block, so every k is tappable.

z_k (the DiTF feature tap) is the image-token `hidden_states` (B, N_img, D) the block receives; image
and text tokens travel in separate streams, so no slicing is needed. The text stream is the block's
`encoder_hidden_states`. Blocks return `(encoder_hidden_states, hidden_states)`; the last block's text
stream is None.
(shift, scale, gate) is the image-stream attention AdaLN `norm1`: chunks 0-2 (shift_msa, scale_msa,
gate_msa) of `norm1.linear(silu(temb))`, which has 6 * D outputs (`AdaLayerNormZero`) or, in SD3.5's
dual-attention layers (`SD35AdaLayerNormZeroX`), 9 * D with the same first six followed by the second
attention's (shift_msa2, scale_msa2, gate_msa2). The block feeds `(1 + scale_msa) * LN(z) + shift_msa`
(LN without affine, eps 1e-6) to its joint attention; the second attention's modulation is not used.

Latents: the SD3 VAE (16 channels, x8) normalised as `(z - shift_factor) * scaling_factor` (0.0609 and
1.5305 in the released VAE config), patch 2, so the feature stride is 16 px. The token grid may be at
most `pos_embed_max_size` tokens per side (192 in the released models: 3072 px).
Noise: flow matching, x_t = s * noise + (1 - s) * x0 with s = t / 1000 (no time shift), and the
transformer's `timestep` is s * 1000 = t, a float, as in `StableDiffusion3Pipeline`.
Prompts: CLIP-L + CLIP-G (77 tokens each, penultimate layer, pooled projections concatenated) + T5
(256 tokens), through `StableDiffusion3Pipeline.encode_prompt` without classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditf.arch.base import (
    BATCHED_CFG_UNCOND_FIRST,
    ArchSpec,
    BlockInputs,
    BlockRef,
    Conditioning,
    expand_batch,
    text_prompt,
)
from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.versions import diffusers_hint

T5_TOKENS = 256
"""T5 sequence length `StableDiffusion3Pipeline.encode_prompt` pads to by default."""


class SD3Arch(ArchSpec):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    stages = ("transformer_blocks",)
    block_forward_params = {"transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb")}
    pipeline_class = "StableDiffusion3Pipeline"
    noise_convention = "flow"
    text_limits = {"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": T5_TOKENS}
    cfg_layouts = {name: BATCHED_CFG_UNCOND_FIRST
                   for name in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")}
    block_output_image = 1
    text_stream_param = "encoder_hidden_states"

    def check_layout(self) -> None:
        """Also require the image-stream AdaLN of each loaded block to be a known `norm1` (6 or 9 chunks of D)."""
        super().check_layout()
        for ref in self.loaded_blocks():
            linear = getattr(getattr(ref.module, "norm1", None), "linear", None)
            if not isinstance(linear, nn.Linear) or linear.out_features not in (6 * self.width, 9 * self.width):
                raise UnsupportedLayoutError(
                    f"{ref.path}.norm1 of this SD3 model is not an AdaLayerNormZero / SD35AdaLayerNormZeroX with 6 or 9 "
                    f"chunks of {self.width} channels. {diffusers_hint()}"
                )

    @property
    def width(self) -> int:
        """Channels D of the residual stream."""
        return int(self.transformer.inner_dim)

    # ------------------------------------------------------------ block taps
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k = `hidden_states` (B, N_img, D); (shift, scale, gate) = chunks 0-2 of `norm1.linear(silu(temb))`, (B, D) each."""
        linear = block.module.norm1.linear
        chunks = linear(F.silu(kwargs["temb"])).chunk(linear.out_features // self.width, dim=1)
        shift, scale, gate = chunks[:3]
        return BlockInputs(kwargs["hidden_states"], kwargs["encoder_hidden_states"], shift, scale, gate)

    # ------------------------------------------------------- latents, noise
    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw SD3-VAE latents (B, 16, H, W) -> `(z - shift_factor) * scaling_factor`, same shape."""
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def check_token_grid(self, latent_hw: tuple[int, int]) -> None:
        """Raise when a latent (H, W) needs more positional embeddings than the model has."""
        limit = self.transformer.config.pos_embed_max_size
        h, w = self.token_grid(latent_hw)
        if limit is not None and max(h, w) > limit:
            pixels = limit * self.stride
            raise InvalidArgumentError(
                f"the image is {h}x{w} tokens ({h * self.stride}x{w * self.stride} px), but this SD3 model has "
                f"positional embeddings for at most {limit} tokens per side ({pixels} px at stride {self.stride}). "
                f"Use a smaller `resolution` (at most {pixels})."
            )

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Transformer on noisy latents (B, 16, H, W) with `timestep` = t (sigma * 1000, fp32 as the pipeline passes it).

        `guidance` is unused (SD3 has no guidance embedding).
        """
        self.check_token_grid(tuple(latents.shape[-2:]))
        batch = latents.shape[0]
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=expand_batch(cond["prompt_embeds"], batch).to(latents),
            pooled_projections=expand_batch(cond["pooled_prompt_embeds"], batch).to(latents),
            timestep=torch.full((batch,), float(t), device=latents.device, dtype=torch.float32),
            return_dict=False,
        )

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """`run` needs the CLIP+T5 sequence (B, 77 + 256, joint_attention_dim) and pooled CLIP-L+G (B, 2048)."""
        return ("prompt_embeds", "pooled_prompt_embeds")

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """`prompt_embeds` (1, 77 + 256, joint_attention_dim) and `pooled_prompt_embeds` (1, pooled_projection_dim)."""
        prompt = text_prompt(prompt, self.family)
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
