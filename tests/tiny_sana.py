"""A tiny random Sana pipeline (transformer, 32x DC-AE, Gemma-2 with an offline tokenizer), saved to disk."""

from __future__ import annotations

import inspect
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tiny_models import PROMPT, randomize

WIDTH = 16
"""Residual-stream channels C of the tiny transformer (2 heads of 8)."""
NUM_LAYERS = 3
LATENT_CHANNELS = 8
CAPTION_CHANNELS = 32
"""Hidden size of the tiny Gemma-2 text encoder."""


def build_sana_pipeline(folder: Path, *, massive_channels: Sequence[int] = (), massive_value: float = 1000.0) -> Path:
    """Save a tiny `SanaPipeline` to `folder` and return it.

    `massive_channels` get `massive_value` added to the patch-embedding bias, so they are huge in every
    block's image-token residual stream.
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=NUM_LAYERS, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=WIDTH,
        caption_channels=CAPTION_CHANNELS, sample_size=4, patch_size=1,
    )
    randomize(transformer, seed=1)
    with torch.no_grad():
        transformer.patch_embed.proj.bias[list(massive_channels)] += massive_value
    tokenizer = gemma_tokenizer(_instruction_text(SanaPipeline), PROMPT)
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=gemma2_encoder(len(tokenizer), CAPTION_CHANNELS),
        vae=dc_autoencoder(LATENT_CHANNELS),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    pipe.save_pretrained(folder)
    return folder


def dc_autoencoder(latent_channels: int):
    """A tiny `AutoencoderDC` with 32x downsampling (6 levels of 8 channels), like Sana's DC-AE."""
    from diffusers import AutoencoderDC

    levels = 6
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=4, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
        encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
        encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407,
    ).eval()


def gemma2_encoder(vocab_size: int, hidden: int):
    """A 1-layer Gemma-2 text model."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return Gemma2Model(config).eval()


def gemma_tokenizer(*texts: str):
    """A Gemma BPE tokenizer over ASCII characters whose merges make each word of `texts` one token.

    Word-sized tokens keep the ~180-word complex human instruction short, as with the real tokenizer.
    """
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for char in string.printable.replace(" ", "\u2581"):
        vocab.setdefault(char, len(vocab))
    words = [w for text in texts for w in _gemma_words(text)]
    return GemmaTokenizer(vocab=vocab, merges=prefix_merges(words, vocab), add_bos_token=True)


def prefix_merges(words: Iterable[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges (added to `vocab` as new tokens) that grow each word from its first symbol, left to right."""
    merges = []
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[:end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    return merges


def _gemma_words(text: str) -> list[str]:
    """Words as Gemma sees them: spaces become a leading '\u2581' of the next word."""
    words = []
    for line in text.split("\n"):
        words += [("\u2581" if i else "") + w for i, w in enumerate(line.split(" ")) if w]
    return words


def _instruction_text(pipeline_cls: type) -> str:
    """The complex human instruction `SanaPipeline.__call__` prefixes prompts with, as one string."""
    return "\n".join(inspect.signature(pipeline_cls.__call__).parameters["complex_human_instruction"].default)
