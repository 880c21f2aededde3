"""A tiny random Qwen-Image pipeline (transformer, video VAE, Qwen2.5-VL with an offline tokenizer), saved to disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tiny_models import PROMPT, randomize
from tiny_sana import prefix_merges

WIDTH = 32
"""Residual-stream channels C of the tiny transformer (2 heads of 16)."""
NUM_LAYERS = 3
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32
"""Hidden size of the tiny Qwen2.5-VL text model (= the transformer's joint_attention_dim)."""
LATENTS_MEAN = [0.5, -0.25, 1.0, 0.0]
LATENTS_STD = [2.0, 0.5, 1.5, 1.0]


def build_qwen_image_pipeline(folder: Path, *, massive_channels: Sequence[int] = (), massive_value: float = 1000.0) -> Path:
    """Save a tiny `QwenImagePipeline` to `folder` and return it.

    `massive_channels` get `massive_value` added to the bias of `img_in` (the image-token projection), so
    they are huge in every block's image stream.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=NUM_LAYERS,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),
    )
    randomize(transformer, seed=1)
    with torch.no_grad():
        transformer.img_in.bias[list(massive_channels)] += massive_value
    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    tokenizer = qwen_tokenizer([template.format(PROMPT)], specials=["<|im_start|>", "<|im_end|>"])
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=qwen_image_vae(LATENT_CHANNELS),
        text_encoder=qwen2_5_vl(len(tokenizer), TEXT_HIDDEN),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def qwen_image_vae(z_dim: int):
    """A tiny `AutoencoderKLQwenImage` with 8x spatial downsampling and non-trivial per-channel statistics."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN,
                                  latents_std=LATENTS_STD).eval()


def qwen2_5_vl(vocab_size: int, hidden: int):
    """A 2-layer Qwen2.5-VL (1-layer vision tower, never used for text-only prompts)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_tokenizer(texts: Sequence[str], specials: Sequence[str], chat_template: str | None = None):
    """A byte-level BPE `Qwen2Tokenizer` whose merges make every word of `texts` one token.

    With word tokens, QwenImagePipeline's system prefix is 34 tokens, as with the real tokenizer, so its
    fixed prefix drop cuts exactly the prefix. `specials` become single special tokens.
    """
    import regex
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(range(256))}
    split_specials = regex.compile("|".join(regex.escape(s) for s in specials))
    words = [
        "".join(byte_chars[b] for b in word.encode())
        for text in texts for piece in split_specials.split(text) for word in regex.findall(PRETOKENIZE_REGEX, piece)
    ]
    merges = prefix_merges(words, vocab)
    for token in ["<|endoftext|>", *specials]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>",
                               eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
