"""Qwen-Image: `QwenImageTransformer2DModel` with `QwenImagePipeline`.

Blocks: one list of 60 dual-stream `transformer_blocks`; k is the position in that list.

z_k (the DiTF tap) is the image-token `hidden_states` block k receives, (B, h*w, C): image and text are
separate streams, so no slicing; blocks return `(encoder_hidden_states, hidden_states)`. (shift, scale,
gate) are the first three chunks of the block's own `img_mod(temb)` (a SiLU + Linear to 6*C, split into
the attention half and the MLP half), which the block applies as `(1 + scale) * LayerNorm(z_k) + shift`
(eps 1e-6, no affine) before the joint attention.
Models with `zero_cond_t` (Qwen-Image-Edit-2511) modulate reference-image tokens with t = 0; then the
vectors are per token, (B, N, C).

Latents: `AutoencoderKLQwenImage` is a video VAE: images go in as 5-D (B, 3, T=1, H, W) and the
posterior is 5-D; the adapter drops T. Normalisation is per channel, `(z - latents_mean) / latents_std`
from the VAE config. The transformer's 2x2 patching is done outside it, by packing latents
(B, c, H, W) into (B, H/2 * W/2, 4c) tokens as FLUX does, so the feature stride is 16 px;
`img_shapes = [[(1, H/2, W/2)]] * B` tells it the grid.

Noise: flow matching, x_t = s * noise + (1 - s) * x0 with s = t / 1000, and the `timestep` argument is s
(the pipeline divides its 0..1000 timesteps by 1000). Prompts: Qwen2.5-VL's last hidden state under the
pipeline's chat template, whose 34-token system prefix is dropped; `prompt_embeds_mask` is None when
every token is valid.
"""

from __future__ import annotations

from typing import Any

import torch

from ditf.arch.base import (
    BlockInputs,
    BlockRef,
    CfgLayout,
    Conditioning,
    PackedLatentsArch,
    expand_batch,
    pack_2x2,
    text_prompt,
)
from ditf.errors import InvalidArgumentError

MAX_PROMPT_TOKENS = 1024
"""`max_sequence_length` QwenImagePipeline encodes prompts with (its default and its maximum)."""


class QwenImageArch(PackedLatentsArch):
    family = "qwen-image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    stages = ("transformer_blocks",)
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb"),
    }
    pipeline_class = "QwenImagePipeline"
    noise_convention = "flow"
    text_limits = {"tokenizer": MAX_PROMPT_TOKENS}
    cfg_layouts = {name: CfgLayout("sequential", scale_argument="true_cfg_scale",
                                   negative_arguments=("negative_prompt", "negative_prompt_embeds"))
                   for name in ("QwenImagePipeline", "QwenImageImg2ImgPipeline")}
    """True CFG calls the transformer for cond, then uncond (without a negative prompt: one call)."""
    block_output_image = 1
    text_stream_param = "encoder_hidden_states"

    # ------------------------------------------------------------ block taps
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k (B, N, C), the text stream (B, T, C) and the attention (shift, scale, gate) of block k."""
        image = kwargs["hidden_states"]
        modulation = block.module.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]
        index = kwargs.get("modulate_index")
        if index is not None:
            # zero_cond_t: the batch of `temb` is doubled, [t, 0]; `index` picks a half per image token.
            noisy, clean = modulation.chunk(2, dim=0)
            modulation = torch.where(index[..., None] == 0, noisy[:, None], clean[:, None])
        shift, scale, gate = modulation.chunk(3, dim=-1)
        return BlockInputs(image, kwargs["encoder_hidden_states"], shift, scale, gate)

    # ------------------------------------------------------- latents, noise
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamplings), 8 for the released VAE."""
        if self.vae is not None and hasattr(self.vae.config, "temperal_downsample"):
            return 2 ** len(self.vae.config.temperal_downsample)
        return 8

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, c, H, W) -> `(z - latents_mean) / latents_std` per channel, same shape."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) / std

    def encode_images(self, pixels: torch.Tensor, num_samples: int | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] -> normalised latents (1 or num_samples, c, H/8, W/8).

        The video VAE sees one frame, (1, 3, 1, H, W). Samples draw their noise from `generator` in the
        same order as diffusers' `latent_dist.sample(generator)`, so one sample matches the pipeline's.
        """
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist
        if num_samples is None:
            raw = dist.mode()
        else:
            eps = torch.randn((num_samples, *dist.mean.shape[1:]), generator=generator, dtype=torch.float32)
            raw = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        return self.normalize_latents(raw.squeeze(2))

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Call the transformer on noisy latents (B, c, H, W) at t in 0..1000.

        `guidance` is required only by guidance-distilled checkpoints (`guidance_embeds=True`).
        """
        batch = latents.shape[0]
        h, w = self.token_grid(tuple(latents.shape[-2:]))
        tokens = pack_2x2(latents)
        mask = cond.get("prompt_embeds_mask")
        guidance_vec = None
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise InvalidArgumentError(
                    "guidance=None, but this Qwen-Image checkpoint is guidance-distilled (guidance_embeds=True): "
                    "pass guidance=<its guidance scale>."
                )
            guidance_vec = torch.full((batch,), guidance, device=latents.device, dtype=latents.dtype)
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=expand_batch(cond["prompt_embeds"], batch).to(latents),
            encoder_hidden_states_mask=None if mask is None else expand_batch(mask, batch).to(latents.device),
            timestep=torch.full((batch,), t / 1000.0, device=latents.device, dtype=latents.dtype),
            img_shapes=[[(1, h, w)]] * batch,
            guidance=guidance_vec,
            return_dict=False,
        )

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """Qwen2.5-VL embeddings (B, T, 3584)."""
        return ("prompt_embeds",)

    def optional_conditioning_keys(self) -> tuple[str, ...]:
        """`prompt_embeds_mask` (B, T) marks padding."""
        return ("prompt_embeds_mask",)

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """Encode `prompt` as `QwenImagePipeline.__call__` does (chat template, prefix dropped)."""
        prompt = text_prompt(prompt, "Qwen-Image")
        embeds, mask = pipeline.encode_prompt(prompt, device=device, max_sequence_length=MAX_PROMPT_TOKENS)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
