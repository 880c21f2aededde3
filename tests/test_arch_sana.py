"""Sana adapter: what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from tiny_models import latents_and_noise, photo
from tiny_sana import LATENT_CHANNELS, NUM_LAYERS, PROMPT

T = 261.0
LATENT_SHAPE = (1, LATENT_CHANNELS, 4, 3)
"""A 128x96 px image: 4x3 latent cells of 32 px, one token each."""


@pytest.fixture
def fx(tiny_featurizer) -> DiTFeaturizer:
    return tiny_featurizer("sana")


def test_the_dc_autoencoder_is_deterministic_so_vae_sampling_modes_agree(fx):
    settings = dict(t=T, block=1, ensemble=2, resolution=128, progress=False)
    per_member, mode = (fx(photo(128, 96), PROMPT, vae_sample=m, **settings)[0] for m in ("per_member", "mode"))
    assert torch.equal(per_member, mode)


def test_latents_are_the_dc_latent_times_the_scaling_factor(fx):
    pixels = torch.rand(1, 3, 128, 96) * 2 - 1
    with torch.no_grad():
        expected = fx.vae.encode(pixels).latent * 0.41407
        torch.testing.assert_close(fx.arch.encode_images(pixels, 4, torch.Generator()), expected)
    assert expected.shape == LATENT_SHAPE and fx.arch.stride == 32


def test_the_prompt_mask_reaches_the_cross_attention(fx):
    """Padding positions (mask 0) of the Gemma embeddings cannot change the features of a later block."""
    cond = fx.encode_prompt(PROMPT)
    embeds, mask = cond["prompt_embeds"], cond["prompt_attention_mask"]
    assert embeds.shape == (1, 300, 32) and mask.shape == (1, 300) and 0 < mask.sum() < 300
    scrambled = torch.where(mask[..., None].bool(), embeds, torch.randn_like(embeds) * 10)
    latents, noise = latents_and_noise(LATENT_SHAPE)

    def features(prompt_embeds):
        return fx.from_latents(latents, noise, prompt_embeds=prompt_embeds, prompt_attention_mask=mask, t=T,
                               block=NUM_LAYERS - 1).features

    torch.testing.assert_close(features(scrambled), features(embeds), rtol=0, atol=1e-5)
    assert torch.equal(features(embeds), fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_LAYERS - 1).features)
    with pytest.raises(InvalidArgumentError, match="prompt_attention_mask"):
        fx.from_latents(latents, noise, prompt_embeds=embeds, t=T, block=0)


def test_sana_sprint_checkpoints_are_refused_at_load():
    from diffusers import SanaTransformer2DModel

    from ditf.arch import arch_for

    sprint = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                    caption_channels=8, sample_size=4, guidance_embeds=True)
    with pytest.raises(UnsupportedLayoutError, match="Sana-Sprint"):
        arch_for(sprint)


def test_the_timestep_reaches_the_transformer_in_float32_as_sana_pipeline_passes_it(tiny_pipeline_dir):
    """In bf16, 261 * timestep_scale would round (bf16 has 8 bits of mantissa: 261 -> 260); SanaPipeline keeps fp32."""
    fx = DiTFeaturizer.from_pretrained(str(tiny_pipeline_dir("sana")), torch_dtype=torch.bfloat16, device="cpu")
    seen = []
    handle = fx.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["timestep"]),
                                                      with_kwargs=True)
    try:
        fx(photo(128, 96), PROMPT, t=261, block=0, ensemble=1, resolution=128, progress=False)
    finally:
        handle.remove()
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == [261.0 * fx.transformer.config.timestep_scale]
