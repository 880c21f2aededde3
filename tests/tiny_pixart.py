"""A tiny random PixArt-alpha / PixArt-Sigma pipeline, saved with `save_pretrained` for the PixArt adapter tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tiny_models import kl_vae, randomize, t5_encoder, t5_tokenizer

WIDTH = 24
"""Residual-stream channels D (3 heads of 8; the size embeddings of PixArt-alpha need D divisible by 3)."""
NUM_LAYERS = 3


def build_pixart_pipeline(folder: Path, *, sigma: bool = False, additional_conditions: bool | None = None,
                          massive_channels: Sequence[int] = (), massive_value: float = 300.0) -> Path:
    """Save a tiny PixArt pipeline to `folder` and return it.

    The default is PixArt-alpha-1024-like (`PixArtAlphaPipeline`, resolution and aspect-ratio embeddings,
    SD VAE scaling 0.18215); `sigma=True` is PixArt-Sigma-like (`PixArtSigmaPipeline`, no additional
    conditions, SDXL VAE scaling 0.13025). `additional_conditions=False` with alpha is PixArt-alpha-512-like
    (no resolution embeddings, which the alpha pipeline passes only at sample_size 128). `massive_channels` get `massive_value` added to the
    patch-embedding bias, so they are huge in every block's residual stream.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    t5_tok = t5_tokenizer()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=NUM_LAYERS, cross_attention_dim=WIDTH, sample_size=8, patch_size=2,
                                           caption_channels=32,
                                           use_additional_conditions=not sigma if additional_conditions is None
                                           else additional_conditions)
    randomize(transformer, seed=1)
    with torch.no_grad():
        transformer.pos_embed.proj.bias[list(massive_channels)] += massive_value
    pipeline_cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline_cls(
        tokenizer=t5_tok,
        text_encoder=randomize(t5_encoder(len(t5_tok), d_model=32), seed=2),
        vae=kl_vae(4, scaling_factor=0.13025 if sigma else 0.18215),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
    )
    pipe.save_pretrained(folder)
    return folder
