"""FLUX.1 (dev, schnell): `FluxTransformer2DModel`.

Blocks: k = 0..18 are the double-stream `transformer_blocks`, k = 19.. the single-stream
`single_transformer_blocks` (k = 28 is single block 9), as in the DiTF authors' code.

z_k (the DiTF feature tap) is the image-token `hidden_states` the block receives. diffusers (>= 0.35)
passes image and text tokens to single blocks separately, so no slicing is needed.
(shift, scale, gate) is the block's image-stream attention AdaLN: for single blocks
`norm.linear(silu(temb)).chunk(3)`, for double blocks chunks 0-2 of `norm1.linear(silu(temb)).chunk(6)`
(shift_msa, scale_msa, gate_msa). The authors' code taps double blocks after attention (norm2); we use
the block input for every block so that k means the same thing everywhere.

Latents: the FLUX VAE (16 channels, x8) normalised as `(z - shift_factor) * scaling_factor`, packed 2x2
into 64-channel tokens; noise by flow matching with the timestep passed as t / 1000; FLUX.1-dev embeds
the guidance scale (3.5 by default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ditf.arch.base import ArchSpec, BlockInputs, BlockRef, Conditioning, expand_batch


class FluxArch(ArchSpec):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    stages = ("transformer_blocks", "single_transformer_blocks")
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb"),
        "single_transformer_blocks": ("hidden_states", "encoder_hidden_states", "temb"),
    }
    pipeline_class = "FluxPipeline"
    noise_convention = "flow"
    text_limits = {"tokenizer": 77, "tokenizer_2": 512}

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        adaln = block.module.norm1 if block.stage == "transformer_blocks" else block.module.norm
        shift, scale, gate = adaln.linear(F.silu(kwargs["temb"])).chunk(adaln.linear.out_features // self.width, dim=1)[:3]
        return BlockInputs(kwargs["hidden_states"], kwargs["encoder_hidden_states"], shift, scale, gate)

    def replace_image_input(self, block: BlockRef, args: tuple, kwargs: dict, image: torch.Tensor) -> tuple[tuple, dict]:
        return args, {**kwargs, "hidden_states": image}

    @property
    def width(self) -> int:
        return self.transformer.inner_dim

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        batch, channels, height, width = latents.shape
        h, w = self.token_grid((height, width))
        tokens = latents.reshape(batch, channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, channels * 4)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).to(latents)
        prompt_embeds = expand_batch(cond["prompt_embeds"], batch).to(latents)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3).to(latents)
        timestep = torch.full((batch,), t / 1000.0, device=latents.device, dtype=latents.dtype)
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            guidance_vec = torch.full((batch,), 3.5 if guidance is None else guidance, device=latents.device, dtype=latents.dtype)
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=expand_batch(cond["pooled_prompt_embeds"], batch).to(latents),
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance_vec,
            return_dict=False,
        )

    def conditioning_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds", "pooled_prompt_embeds")

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        prompt_embeds, pooled, _ = pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=512)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
