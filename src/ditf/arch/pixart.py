"""PixArt-alpha and PixArt-Sigma: `PixArtTransformer2DModel` (adaLN-single, T5 cross-attention).

Blocks: one list, `transformer_blocks` (`BasicTransformerBlock` with `norm_type="ada_norm_single"`),
so k is the list index: k = 0..27 for the released XL-2 models.

z_k (the DiTF feature tap) is the image-token `hidden_states` (B, N_img, D), the block's first
positional argument. PixArt has no text residual stream: T5 tokens enter every block through
cross-attention as a fixed context (`encoder_hidden_states`), so `BlockInputs.text` is None; blocks
return the image stream alone.
(shift, scale, gate): the model computes one 6 * D vector per image from the timestep
(`adaln_single`, plus resolution / aspect-ratio embeddings when `use_additional_conditions`, as in
PixArt-alpha-1024) and passes it to every block as the `timestep` kwarg; each block adds its own learned
`scale_shift_table` (6, D): `(table + timestep.view(B, 6, D))` gives rows shift_msa, scale_msa, gate_msa,
shift_mlp, scale_mlp, gate_mlp. No module computes them, so they are recomputed here from the block's
call. The block feeds `(1 + scale_msa) * norm1(z) + shift_msa` (norm1: LayerNorm without affine, eps 1e-6)
to its self-attention.

Latents: the SD VAE (PixArt-alpha) or SDXL VAE (PixArt-Sigma), 4 channels, x8, normalised as
`z * scaling_factor` (no shift, as in the pipelines); patch 2, so the feature stride is 16 px.
Noise: DDPM, x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise with the linear beta schedule 1e-4..0.02 over
1000 steps; the transformer's `timestep` is the integer t (0..999). With `use_additional_conditions`,
`resolution` is the (height, width) of the image in pixels and `aspect_ratio` height / width, as the
pipeline passes them.
Prompts: T5 with its attention mask, 120 tokens for `PixArtAlphaPipeline`, 300 for `PixArtSigmaPipeline`,
without classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
from ditf.versions import diffusers_hint

T5_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
"""T5 sequence length each PixArt pipeline pads to by default (PixArt-alpha and PixArt-Sigma papers)."""

BLOCK_LAYER_NORM_EPS = 1e-6
"""eps of the blocks' affine-free `norm1`, the LayerNorm DiTF re-applies to z_k."""


class PixArtArch(ArchSpec):
    family = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    stages = ("transformer_blocks",)
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                               "timestep"),
    }
    pipeline_class = "PixArtAlphaPipeline"
    noise_convention = "ddpm"
    text_limits = {"tokenizer": T5_TOKENS["PixArtSigmaPipeline"]}
    """The longer (Sigma) limit: PixArt-alpha's 120 depends on the pipeline, which also warns when it truncates."""
    cfg_layouts = {name: BATCHED_CFG_UNCOND_FIRST for name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline")}

    def check_layout(self) -> None:
        """Also require adaLN-single blocks (a `scale_shift_table` (6, D)) whose `norm1` is DiTF's LayerNorm."""
        super().check_layout()
        for ref in self.loaded_blocks():
            table = getattr(ref.module, "scale_shift_table", None)
            norm = getattr(ref.module, "norm1", None)
            adaln_single = getattr(ref.module, "norm_type", None) == "ada_norm_single"
            if not adaln_single or table is None or tuple(table.shape) != (6, self.width):
                raise UnsupportedLayoutError(
                    f"{ref.path} of this PixArt model is not an adaLN-single block with a (6, {self.width}) "
                    f"scale_shift_table. {diffusers_hint()}"
                )
            if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine or norm.eps != BLOCK_LAYER_NORM_EPS:
                raise UnsupportedLayoutError(
                    f"{ref.path}.norm1 is {norm!r}; DiTF features need the affine-free LayerNorm with eps "
                    f"{BLOCK_LAYER_NORM_EPS} of the released PixArt models (config norm_elementwise_affine=False, "
                    "norm_eps=1e-6)."
                )

    @property
    def width(self) -> int:
        """Channels D of the residual stream."""
        return int(self.transformer.inner_dim)

    # ------------------------------------------------------------ block taps
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k = `hidden_states` (B, N_img, D); (shift, scale, gate) = rows 0-2 of `table + timestep.view(B, 6, D)`.

        Each of shift, scale, gate is (B, D).
        """
        image = args[0] if args else kwargs["hidden_states"]
        shift, scale, gate = adaln_single_modulation(block.module.scale_shift_table, kwargs["timestep"], image.shape[0])
        return BlockInputs(image, None, shift, scale, gate)

    # ------------------------------------------------------- latents, noise
    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, 4, H, W) -> `z * scaling_factor`, same shape."""
        return latents * self.vae.config.scaling_factor

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Transformer on noisy latents (B, 4, H, W) at integer DDPM timestep `ddpm_index(t)`; `guidance` is unused.

        `cond` holds `prompt_embeds` (1 or B, T, caption_channels) and `prompt_attention_mask` (1 or B, T).
        """
        batch, _, height, width = latents.shape
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            pixels_h, pixels_w = height * self.vae_scale_factor, width * self.vae_scale_factor
            like_latents = dict(dtype=latents.dtype, device=latents.device)
            added_cond_kwargs = {
                "resolution": torch.tensor([[pixels_h, pixels_w]], **like_latents).expand(batch, 2),
                "aspect_ratio": torch.tensor([[pixels_h / pixels_w]], **like_latents).expand(batch, 1),
            }
        return self.transformer(
            latents,
            encoder_hidden_states=expand_batch(cond["prompt_embeds"], batch).to(latents),
            encoder_attention_mask=expand_batch(cond["prompt_attention_mask"], batch).to(latents.device),
            timestep=torch.full((batch,), self.ddpm_index(t), dtype=torch.long, device=latents.device),
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """`run` needs the T5 sequence (B, T, caption_channels) and its 0/1 attention mask (B, T)."""
        return ("prompt_embeds", "prompt_attention_mask")

    def encode_prompt(self, pipeline: Any, prompt: str, device: torch.device) -> Conditioning:
        """`prompt_embeds` (1, T, caption_channels) and `prompt_attention_mask` (1, T); T = 120 (alpha), 300 (Sigma)."""
        prompt = text_prompt(prompt, "PixArt")
        tokens = T5_TOKENS.get(type(pipeline).__name__, T5_TOKENS[self.pipeline_class])
        prompt_embeds, mask, _, _ = pipeline.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=device, clean_caption=False, max_sequence_length=tokens,
        )
        return {"prompt_embeds": prompt_embeds, "prompt_attention_mask": mask}
