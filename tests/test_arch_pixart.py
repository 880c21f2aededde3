"""PixArt-alpha / PixArt-Sigma adapter: tiny random pipelines saved to disk and loaded the way users load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_pixart import NUM_LAYERS, WIDTH, build_pixart_pipeline

T = 261.0
LATENT_SHAPE = (1, 4, 8, 6)
"""A 64x48 px image: 4x3 tokens of 2x2 latent cells."""


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, variant) -> Path:
    return build_pixart_pipeline(tmp_path_factory.mktemp(variant) / "pipeline", sigma=variant == "sigma")


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def test_the_pipeline_class_follows_model_index_and_sets_the_t5_length(fx, variant):
    expected = {"alpha": ("PixArtAlphaPipeline", 120), "sigma": ("PixArtSigmaPipeline", 300)}[variant]
    cond = fx.encode_prompt("a cat")
    assert (type(fx.text_pipeline).__name__, cond["prompt_embeds"].shape[1]) == expected
    assert cond["prompt_attention_mask"].shape == (1, expected[1])


def test_images_give_one_feature_map_per_image_on_the_16px_grid(fx):
    images = [photo(64, 48, seed=0), photo(64, 48, seed=1)]
    settings = dict(t=T, block=1, ensemble=2, resolution=64, progress=False)

    features = fx(images, "a photo of a cat", seed=0, **settings)
    assert features.shape == (2, WIDTH, 64 // 16, 48 // 16)
    assert torch.equal(features, fx(images, "a photo of a cat", seed=0, **settings))
    assert not torch.allclose(features, fx(images, "a photo of a cat", seed=1, **settings))


@pytest.mark.parametrize("block", range(NUM_LAYERS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_self_attention(fx, block):
    """Shift and scale recomputed from scale_shift_table + the model-level timestep vector are the block's own."""
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    parts = fx.from_latents(latents, noise, prompt="a cat", t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = []
    attention = fx.transformer.transformer_blocks[block].attn1
    handle = attention.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            noisy = fx.arch.noise_latents(latents, noise, T)
            fx.arch.run(noisy, T, fx.encode_prompt("a cat"))
    finally:
        handle.remove()
    torch.testing.assert_close(by_hand, seen[0][0], rtol=0, atol=1e-5)


def test_alpha_modulation_embeds_the_image_size_and_sigma_ignores_it(fx, variant):
    """PixArt-alpha-1024 conditions its AdaLN on resolution and aspect ratio; PixArt-Sigma does not."""
    gen = torch.Generator().manual_seed(0)
    shifts = []
    for shape in [(1, 4, 8, 8), (1, 4, 8, 4)]:
        latents, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        shifts.append(fx.from_latents(latents, noise, t=T, block=0, return_parts=True).shift)
    assert torch.equal(shifts[0], shifts[1]) == (variant == "sigma")


def test_padding_tokens_are_masked_out_of_the_cross_attention(fx):
    """Garbage in the padded T5 positions changes nothing when the prompt's attention mask is passed."""
    cond = fx.encode_prompt("a cat")
    mask = cond["prompt_attention_mask"]
    garbage = torch.where(mask[..., None].bool(), cond["prompt_embeds"], torch.full_like(cond["prompt_embeds"], 7.0))
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)

    encoded = fx.from_latents(latents, noise, prompt="a cat", t=T, block=2)
    padded = fx.from_latents(latents, noise, prompt_embeds=garbage, prompt_attention_mask=mask, t=T, block=2)
    torch.testing.assert_close(padded.features, encoded.features, rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="prompt_attention_mask"):
        fx.from_latents(latents, noise, prompt_embeds=garbage, t=T, block=2)


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=1, device="cpu")
    image = photo(64, 64)
    settings = dict(t=T, ensemble=2, resolution=64, seed=3, progress=False)

    torch.testing.assert_close(partial(image, block=1, **settings), fx(image, block=1, **settings), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, block=2, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(tmp_path):
    folder = build_pixart_pipeline(tmp_path / "pipeline", massive_channels=(2, 13))
    fx = DiTFeaturizer.from_pretrained(str(folder), device="cpu")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn((2, *LATENT_SHAPE[1:]), generator=gen)

    auto = fx.from_latents(latents, noise, t=T, block=1, discard="auto")
    explicit = fx.from_latents(latents, noise, t=T, block=1, discard=[13, 2])
    kept = fx.from_latents(latents, noise, t=T, block=1, discard=None)
    assert auto.discarded == [2, 13] and explicit.discarded == [2, 13] and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)


@pytest.mark.parametrize("t", [1, 261, 999])
def test_noise_is_the_ddpm_schedulers_own_at_the_integer_timestep(fx, t):
    """Up to the scheduler's fp32 cumulative product of alphas (ditf computes it in fp64)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(fx.text_pipeline.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    expected = scheduler.add_noise(x0, noise, torch.tensor([t]))
    torch.testing.assert_close(fx.arch.noise_latents(x0, noise, float(t)), expected, rtol=0, atol=1e-5)


def test_latents_are_scaled_by_the_vae_config(fx):
    raw = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(fx.arch.normalize_latents(raw), raw * fx.vae.config.scaling_factor)


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_LAYERS - 1}"):
        fx(photo(64, 64), t=T, block=NUM_LAYERS, ensemble=1, resolution=64, progress=False)
