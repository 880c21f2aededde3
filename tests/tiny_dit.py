"""A tiny random class-conditional DiT pipeline, saved with `save_pretrained` for the DiT adapter tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from tiny_models import kl_vae, randomize

NUM_CLASSES = 10
"""Classes 0..9; index 10 is the null class."""
NUM_LAYERS = 3
WIDTH = 16
"""Residual-stream channels D of the tiny transformer (2 heads of 8)."""
SAMPLE_SIZE = 8
"""Latent cells per side: the tiny model takes 64x64 px images only."""
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark, white shark"}
ID2LABEL.update({i: f"class {i}" for i in range(3, NUM_CLASSES)})
"""ImageNet-style labels: one id may have several comma-separated names."""


def build_dit_pipeline(folder: Path, *, massive_channels: Sequence[int] = (), massive_value: float = 300.0) -> Path:
    """Save a tiny `DiTPipeline` (transformer, SD-style VAE, DDIM scheduler, `id2label`) to `folder` and return it.

    `massive_channels` get `massive_value` added to the patch-embedding bias, so they are huge in every
    block's residual stream.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=WIDTH // 2, in_channels=4, out_channels=8,
                                        num_layers=NUM_LAYERS, sample_size=SAMPLE_SIZE, patch_size=2,
                                        num_embeds_ada_norm=NUM_CLASSES)
    randomize(transformer, seed=1)
    with torch.no_grad():
        transformer.pos_embed.proj.bias[list(massive_channels)] += massive_value
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=kl_vae(4), scheduler=scheduler, id2label=ID2LABEL)
    pipe.save_pretrained(folder)
    # DiTPipeline does not save its id2label; the released repositories keep it in model_index.json.
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}
    index_file.write_text(json.dumps(index, indent=2))
    return folder
