"""A random-weight, FLUX.1-architecture smoke model built offline, for demos and tests.

Its features are meaningless (the weights are random); it exists so that every code path, from
`from_pretrained` on a diffusers pipeline folder to the CLI figures, can run on a machine without the
model hub. Tokenizers are letter-level and written to disk, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import uuid
from pathlib import Path

import torch
from torch import nn

from ditf.errors import InvalidArgumentError

LETTERS = list(string.ascii_lowercase)


def randomize(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Add N(0, std^2) noise to every parameter (zero-initialised AdaLN layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)
    return module


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (77 tokens), written to `folder` and loaded from it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def t5_tokenizer(max_length: int = 512):
    """A T5 unigram tokenizer over single letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(letter, -2.0) for letter in LETTERS] + [("\u2581" + letter, -2.5) for letter in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(vocab_size: int, hidden: int = 32, projection: int | None = None, with_projection: bool = False):
    """A 2-layer CLIP text encoder (77 positions), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_encoder(vocab_size: int, d_model: int = 32):
    """A 2-layer T5 encoder, random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


def kl_vae(latent_channels: int, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A tiny `AutoencoderKL` with 8x downsampling (4 levels), like the real FLUX and SD VAEs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         shift_factor=shift_factor, scaling_factor=scaling_factor).eval()


def flux_smoke_transformer(seed: int = 0, massive_channels: tuple[int, ...] = (11, 42)):
    """A FLUX.1-dev-shaped transformer (19 double + 10 single blocks, width 64) with random weights and
    large constants on `massive_channels` of the residual stream, like the real model's massive activations."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=10,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    randomize(model, seed)
    with torch.no_grad():
        for channel, value in zip(massive_channels, (400.0, -250.0)):
            model.x_embedder.bias[channel] += value
    return model.eval()


SMOKE_MARKER = "SMOKE_MODEL.txt"
"""File in every smoke model folder: results of such a folder are labelled as coming from random weights."""


def is_smoke_model(model: str | Path | None) -> bool:
    """True when `model` is a local folder holding a random-weight smoke model."""
    return model is not None and (Path(model).expanduser() / SMOKE_MARKER).is_file()


def build_flux_smoke_pipeline(folder: str | Path, transformer: nn.Module | None = None) -> Path:
    """Save a random-weight FLUX.1 pipeline (transformer, VAE, CLIP + T5, scheduler) to `folder`.

    Built in a temporary folder beside `folder` and renamed into place, so `folder` is either complete or
    absent. `DiTFeaturizer.from_pretrained(folder)` then loads it like any diffusers FLUX folder.
    """
    folder = Path(folder)
    if folder.exists():
        raise InvalidArgumentError(f"{str(folder)!r} exists already; build the smoke model into a new folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        _save_flux_smoke_pipeline(staging / "pipeline", transformer)
        os.rename(staging / "pipeline", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _save_flux_smoke_pipeline(folder: Path, transformer: nn.Module | None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = transformer if transformer is not None else flux_smoke_transformer()
    clip_tok = clip_tokenizer(folder.parent / f".{folder.name}_clip_vocab")
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=kl_vae(16, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_text_encoder(len(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(len(t5_tok), d_model=transformer.config.joint_attention_dim),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    (folder / SMOKE_MARKER).write_text(
        "Random-weight FLUX.1-architecture smoke model built by ditf.smoke. Its features are meaningless.\n"
    )
