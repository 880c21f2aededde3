"""DiT-XL/2 (Peebles & Xie 2023), class-conditional on ImageNet: `DiTTransformer2DModel`.

Blocks: one list, `transformer_blocks` (`BasicTransformerBlock` with `norm_type="ada_norm_zero"`), so k
is the list index: k = 0..27 for DiT-XL/2.

z_k (the DiTF feature tap) is the image-token `hidden_states` (B, N_img, D), the block's first
positional argument, and what it returns; DiT has no text stream (`BlockInputs.text` is None).
(shift, scale, gate): every block's `norm1` (`AdaLayerNormZero`) owns a timestep + class-label embedding
`norm1.emb` and computes `norm1.linear(silu(emb(timestep, class_labels)))`, chunked into shift_msa,
scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; chunks 0-2 are recomputed here from the block's
`timestep` and `class_labels` kwargs. The block feeds `(1 + scale_msa) * LN(z) + shift_msa` (LN without
affine, eps 1e-6) to its self-attention.

Conditioning: an ImageNet class index. The default (empty prompt or None) is the null class
`num_embeds_ada_norm` (1000 for the released models), the "unconditional" label DiT was trained with
for classifier-free guidance; a class is given as an int, a digit string, or a label name from the
pipeline's `id2label` (e.g. "golden retriever").

Latents: the SD VAE (4 channels, x8) normalised as `z * scaling_factor` (0.18215); patch 2, so the
feature stride is 16 px. The model was trained at one size, `sample_size` latent cells per side (32 for
DiT-XL-2-256, 64 for -512): inputs must be exactly that (256 or 512 px square).
Noise: DDPM, x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise with the linear beta schedule 1e-4..0.02 over
1000 steps; the transformer's `timestep` is the integer t (0..999). The output has a learned-sigma half
(out_channels = 2 * in_channels), irrelevant here since the forward stops at block k.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ditf.arch.base import (
    ArchSpec,
    BlockInputs,
    BlockRef,
    CfgLayout,
    Conditioning,
    expand_batch,
)
from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.versions import diffusers_hint


class DiTArch(ArchSpec):
    family = "dit"
    transformer_classes = ("DiTTransformer2DModel",)
    stages = ("transformer_blocks",)
    block_forward_params = {
        "transformer_blocks": ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                               "timestep", "cross_attention_kwargs", "class_labels"),
    }
    pipeline_class = "DiTPipeline"
    noise_convention = "ddpm"
    cfg_layouts = {"DiTPipeline": CfgLayout("batched", ("cond", "uncond"))}
    """`DiTPipeline` runs the batch [class labels, null class] when guidance_scale > 1."""

    def check_layout(self) -> None:
        """Also require adaLN-zero blocks whose `norm1` embeds the timestep and class label itself."""
        super().check_layout()
        for ref in self.loaded_blocks():
            norm = getattr(ref.module, "norm1", None)
            if getattr(ref.module, "norm_type", None) != "ada_norm_zero" or getattr(norm, "emb", None) is None:
                raise UnsupportedLayoutError(
                    f"{ref.path} of this DiT model is not an adaLN-zero block with its own timestep/label embedding "
                    f"(`norm1.emb`). {diffusers_hint()}"
                )

    @property
    def num_classes(self) -> int:
        """Number of real classes; the index `num_classes` itself is the null (unconditional) class."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def sample_size(self) -> int:
        """Latent cells per side the model takes (its positional embedding was trained for this size only)."""
        return int(self.transformer.config.sample_size)

    # ------------------------------------------------------------ block taps
    def read_block_inputs(self, block: BlockRef, args: tuple, kwargs: dict) -> BlockInputs:
        """z_k = `hidden_states` (B, N_img, D); (shift, scale, gate) = chunks 0-2 of the block's adaLN-zero, (B, D) each."""
        image = args[0] if args else kwargs["hidden_states"]
        norm = block.module.norm1
        emb = norm.emb(kwargs["timestep"], kwargs["class_labels"], hidden_dtype=image.dtype)
        shift, scale, gate = norm.linear(F.silu(emb)).chunk(6, dim=1)[:3]
        return BlockInputs(image, None, shift, scale, gate)

    # ------------------------------------------------------- latents, noise
    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, 4, H, W) -> `z * scaling_factor`, same shape."""
        return latents * self.vae.config.scaling_factor

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of a latent (H, W), which must be the model's `sample_size` square."""
        self.check_latent_size(latent_hw)
        return super().token_grid(latent_hw)

    def check_latent_size(self, latent_hw: tuple[int, int]) -> None:
        """Raise unless the latent (H, W) is the `sample_size` square the model was trained on."""
        size = self.sample_size
        if tuple(latent_hw) != (size, size):
            pixels = size * self.vae_scale_factor
            height, width = (side * self.vae_scale_factor for side in latent_hw)
            raise InvalidArgumentError(
                f"DiT takes only {pixels}x{pixels} px images (latent {size}x{size}, config sample_size={size}); got "
                f"{height}x{width} px (latent {latent_hw[0]}x{latent_hw[1]}). Pass `size=({pixels}, {pixels})`, or "
                f"`resolution={pixels}` with `pad_square=True`."
            )

    # ------------------------------------------------------------ forward
    def run(self, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float | None = None) -> Any:
        """Transformer on noisy latents (B, 4, S, S) at integer timestep `ddpm_index(t)` for `cond["class_labels"]` (1 or B,).

        `guidance` is unused.
        """
        self.check_latent_size(tuple(latents.shape[-2:]))
        batch = latents.shape[0]
        return self.transformer(
            latents,
            timestep=torch.full((batch,), self.ddpm_index(t), dtype=torch.long, device=latents.device),
            class_labels=expand_batch(cond["class_labels"], batch).to(latents.device),
            return_dict=False,
        )

    # ------------------------------------------------------------ prompts
    def conditioning_keys(self) -> tuple[str, ...]:
        """`run` needs the class index (B,) long."""
        return ("class_labels",)

    def unconditional(self) -> Conditioning:
        """The null class `num_classes` as `class_labels` (1,)."""
        return {"class_labels": torch.tensor([self.num_classes], dtype=torch.long)}

    def encode_prompt(self, pipeline: Any, prompt: str | int | None, device: torch.device) -> Conditioning:
        """`class_labels` (1,) long for `prompt`: None or "" (null class), a class index (int or digits) or a label name.

        Label names are looked up in `pipeline.labels` (the `DiTPipeline`'s `id2label`, split at commas).
        """
        if prompt is None or prompt == "":
            return {k: v.to(device) for k, v in self.unconditional().items()}
        if isinstance(prompt, str) and prompt.strip().isdigit():
            prompt = int(prompt.strip())
        if isinstance(prompt, str):
            labels = getattr(pipeline, "labels", None) or {}
            if prompt.strip() not in labels:
                examples = ", ".join(repr(name) for name in sorted(labels, key=labels.get)[:6])
                known = (f"its labels, in the pipeline's `labels` dict, include {examples}" if labels
                         else "this model has no id2label table")
                raise InvalidArgumentError(
                    f"prompt={prompt!r} is not a class label of this DiT model ({known}). Pass a class index "
                    f"0..{self.num_classes - 1}, a label name from `id2label`, or \"\" for the null class."
                )
            prompt = labels[prompt.strip()]
        if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt <= self.num_classes:
            raise InvalidArgumentError(
                f"prompt={prompt!r} is not a class of this DiT model: pass a class index 0..{self.num_classes - 1}, "
                f"{self.num_classes} (or \"\") for the null class, or a label name."
            )
        return {"class_labels": torch.tensor([prompt], dtype=torch.long, device=device)}
