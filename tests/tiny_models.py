"""Tiny random diffusers models and offline tokenizers, built from configs for the tests.

Every builder returns real diffusers / transformers modules; the tests save them with `save_pretrained`
and load them back through the same path users take.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures"
FLUX_TINY = FIXTURES / "flux_tiny"

WORDS = list(string.ascii_lowercase)


def randomize(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Perturb every parameter so that zero-initialised AdaLN layers or tables cannot hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)
    return module


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (written to `folder`, then loaded from it)."""
    import json

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in WORDS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)


def t5_tokenizer():
    """A T5 unigram tokenizer over single letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(letter, -2.0) for letter in WORDS] + [("\u2581" + letter, -2.5) for letter in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_text_encoder(vocab_size: int, hidden: int = 32, projection: int | None = None, with_projection: bool = False):
    """A 2-layer CLIP text encoder (77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_encoder(vocab_size: int, d_model: int = 32):
    """A 2-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8)
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


def kl_vae(latent_channels: int, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A tiny `AutoencoderKL` with 8x downsampling (4 levels), like the real FLUX/SD VAEs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         shift_factor=shift_factor, scaling_factor=scaling_factor).eval()


def flux_pipeline(folder: Path) -> Path:
    """Save a tiny FLUX.1 pipeline (the flux_tiny fixture transformer, VAE, CLIP + T5) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer")
    clip_tok = clip_tokenizer(folder.parent / f"{folder.name}_clip_vocab")
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
    return folder
