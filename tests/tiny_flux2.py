"""Tiny random FLUX.2 pipelines (klein with Qwen3, dev with Mistral3), saved to disk.

The real dev pipeline's `tokenizer` is a Pixtral `AutoProcessor`, which transformers cannot build without
torchvision; the tiny dev pipeline uses a plain tokenizer with a Mistral-style chat template in its place
(`Flux2Pipeline` only calls its `apply_chat_template`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from tiny_models import PROMPT, randomize
from tiny_qwen_image import qwen_tokenizer

WIDTH = 32
"""Residual-stream channels C of the tiny transformer (2 heads of 16)."""
NUM_DOUBLE = 2
NUM_SINGLE = 2
VAE_CHANNELS = 4
LATENT_CHANNELS = 4 * VAE_CHANNELS
"""Channels of the patchified (2x2) latent = the transformer's in_channels."""
TEXT_HIDDEN = 16
"""Hidden size of the tiny text encoders; FLUX.2 stacks three of their layers, so joint_attention_dim = 48."""
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{{ message['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)


def build_flux2_pipeline(folder: Path, *, variant: Literal["klein", "dev"] = "klein") -> Path:
    """Save a tiny `Flux2KleinPipeline` (variant "klein") or `Flux2Pipeline` ("dev") to `folder` and return it.

    dev embeds the guidance scale, klein does not, as in the released models.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS, num_layers=NUM_DOUBLE, num_single_layers=NUM_SINGLE,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=variant == "dev",
    )
    randomize(transformer, seed=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    if variant == "klein":
        tokenizer = qwen_tokenizer([f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"],
                                   specials=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                   chat_template=QWEN3_TEMPLATE)
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=flux2_vae(VAE_CHANNELS), text_encoder=qwen3(len(tokenizer)),
                                  tokenizer=tokenizer, transformer=transformer)
    else:
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        tokenizer = qwen_tokenizer([f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"],
                                   specials=["<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"],
                                   chat_template=MISTRAL_TEMPLATE)
        pipe = Flux2Pipeline(scheduler=scheduler, vae=flux2_vae(VAE_CHANNELS), text_encoder=mistral3(len(tokenizer)),
                             tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def flux2_vae(latent_channels: int):
    """A tiny `AutoencoderKLFlux2` (8x) whose batch-norm statistics are not the identity."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), latent_channels=latent_channels, layers_per_block=1,
                             norm_num_groups=4, mid_block_add_attention=False).eval()
    gen = torch.Generator().manual_seed(0)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen))
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) + 0.5)
    return vae


def qwen3(vocab_size: int):
    """A Qwen3 causal LM deep enough for Flux2KleinPipeline's hidden layers (9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=27,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def mistral3(vocab_size: int):
    """A Mistral3 model deep enough for Flux2Pipeline's hidden layers (10, 20, 30); 1-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=24,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=None),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=16, image_size=64),
        spatial_merge_size=2, image_token_index=vocab_size - 1,
    )
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(config).eval()
