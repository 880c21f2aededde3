"""PixArt-alpha / PixArt-Sigma adapter: what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_models import latents_and_noise

T = 261.0
LATENT_SHAPE = (1, 4, 8, 6)
"""A 64x48 px image: 4x3 tokens of 2x2 latent cells."""


@pytest.fixture(params=["alpha", "sigma"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def fx(tiny_featurizer, variant) -> DiTFeaturizer:
    return tiny_featurizer(f"pixart-{variant}")


def test_the_pipeline_class_follows_model_index_and_sets_the_t5_length(fx, variant):
    expected = {"alpha": ("PixArtAlphaPipeline", 120), "sigma": ("PixArtSigmaPipeline", 300)}[variant]
    cond = fx.encode_prompt("a cat")
    assert (type(fx.text_pipeline).__name__, cond["prompt_embeds"].shape[1]) == expected
    assert cond["prompt_attention_mask"].shape == (1, expected[1])


def test_alpha_modulation_embeds_the_image_size_and_sigma_ignores_it(fx, variant):
    """PixArt-alpha-1024 conditions its AdaLN on resolution and aspect ratio; PixArt-Sigma does not."""
    shifts = []
    for shape in [(1, 4, 8, 8), (1, 4, 8, 4)]:
        latents, noise = latents_and_noise(shape)
        shifts.append(fx.from_latents(latents, noise, t=T, block=0, return_parts=True).shift)
    assert torch.equal(shifts[0], shifts[1]) == (variant == "sigma")


def test_padding_tokens_are_masked_out_of_the_cross_attention(fx):
    """Garbage in the padded T5 positions changes nothing when the prompt's attention mask is passed."""
    cond = fx.encode_prompt("a cat")
    mask = cond["prompt_attention_mask"]
    garbage = torch.where(mask[..., None].bool(), cond["prompt_embeds"], torch.full_like(cond["prompt_embeds"], 7.0))
    latents, noise = latents_and_noise(LATENT_SHAPE)

    encoded = fx.from_latents(latents, noise, prompt="a cat", t=T, block=2)
    padded = fx.from_latents(latents, noise, prompt_embeds=garbage, prompt_attention_mask=mask, t=T, block=2)
    torch.testing.assert_close(padded.features, encoded.features, rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="prompt_attention_mask"):
        fx.from_latents(latents, noise, prompt_embeds=garbage, t=T, block=2)


def test_latents_are_scaled_by_the_vae_config(fx, variant):
    """The SD VAE's 0.18215 for PixArt-alpha, the SDXL VAE's 0.13025 for PixArt-Sigma, as the tiny VAE configs say."""
    raw = torch.randn(1, 4, 4, 4)
    scaling = {"alpha": 0.18215, "sigma": 0.13025}[variant]
    torch.testing.assert_close(fx.arch.normalize_latents(raw), raw * scaling)


def test_noise_follows_the_pipelines_own_schedule_not_a_hard_coded_one(fx):
    """A checkpoint whose scheduler config has other betas is noised with those betas, exactly."""
    from diffusers import DDPMScheduler

    from ditf.arch import arch_for

    config = {**fx.text_pipeline.scheduler.config, "beta_end": 0.03}
    x0, noise = latents_and_noise(LATENT_SHAPE)
    other = arch_for(fx.transformer, fx.vae, config).noise_latents(x0, noise, T)
    expected = DDPMScheduler.from_config(config).add_noise(x0, noise, torch.tensor([int(T)]))
    assert torch.equal(other, expected) and not torch.allclose(other, fx.arch.noise_latents(x0, noise, T))


def test_a_fractional_timestep_is_refused_not_rounded(fx):
    with pytest.raises(InvalidArgumentError, match=r"t=261.5: pixart runs integer DDPM timesteps.*261 or 262"):
        fx.settings(t=261.5, block=0, ensemble=1)
