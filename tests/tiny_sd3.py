"""A tiny random Stable Diffusion 3 / 3.5 pipeline, saved with `save_pretrained` for the SD3 adapter tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tiny_models import clip_text_encoder, clip_tokenizer, kl_vae, randomize, t5_encoder, t5_tokenizer

WIDTH = 32
"""Residual-stream channels D of the tiny transformer (4 heads of 8)."""
NUM_LAYERS = 3
"""Blocks 0..2; block 2 is the `context_pre_only` one."""
POS_EMBED_MAX_SIZE = 16
"""Tokens per side the tiny model has positional embeddings for (256 px at stride 16)."""


def build_sd3_pipeline(folder: Path, *, sd35: bool = False, massive_channels: Sequence[int] = (),
                       massive_value: float = 300.0) -> Path:
    """Save a tiny `StableDiffusion3Pipeline` to `folder` and return it.

    `sd35=True` gives the SD3.5 layout (dual attention in blocks 0 and 1, RMS qk-norm); `massive_channels`
    get `massive_value` added to the patch-embedding bias, so they are huge in every block's residual stream.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=NUM_LAYERS, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=WIDTH, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=POS_EMBED_MAX_SIZE,
        dual_attention_layers=(0, 1) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )
    randomize(transformer, seed=1)
    with torch.no_grad():
        transformer.pos_embed.proj.bias[list(massive_channels)] += massive_value
    clip_tok = clip_tokenizer(folder.parent / f"{folder.name}_clip_vocab")  # CLIP-L and CLIP-G share one vocabulary
    t5_tok = t5_tokenizer()
    clip_l = clip_text_encoder(len(clip_tok), hidden=16, projection=16, with_projection=True)
    clip_g = randomize(clip_text_encoder(len(clip_tok), hidden=16, projection=16, with_projection=True), seed=2)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=kl_vae(16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip_l, tokenizer=clip_tok,
        text_encoder_2=clip_g, tokenizer_2=clip_tok,
        text_encoder_3=t5_encoder(len(t5_tok), d_model=32), tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(folder)
    return folder
