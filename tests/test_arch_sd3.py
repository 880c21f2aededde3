"""SD3 / SD3.5 adapter: tiny random pipelines saved to disk and loaded the way users load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_sd3 import NUM_LAYERS, POS_EMBED_MAX_SIZE, WIDTH, build_sd3_pipeline

T = 261.0
LATENT_SHAPE = (1, 16, 8, 6)
"""A 128x96 px image: 4x3 tokens of 2x2 latent cells."""


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, variant) -> Path:
    return build_sd3_pipeline(tmp_path_factory.mktemp(variant) / "pipeline", sd35=variant == "sd3.5")


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def test_images_give_one_feature_map_per_image_on_the_16px_grid(fx):
    images = [photo(64, 48, seed=0), photo(64, 48, seed=1)]
    settings = dict(t=T, block=1, ensemble=2, resolution=64, progress=False)

    features = fx(images, "a photo of a cat", seed=0, **settings)
    assert features.shape == (2, WIDTH, 64 // 16, 48 // 16)
    assert torch.equal(features, fx(images, "a photo of a cat", seed=0, **settings))
    assert not torch.allclose(features, fx(images, "a photo of a cat", seed=1, **settings))


@pytest.mark.parametrize("block", range(NUM_LAYERS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_attention(fx, block):
    """(1 + scale) * LN(z_k) + shift from the parts equals the joint attention's image input, for every block
    (the last one is context_pre_only; SD3.5 blocks 0-1 have dual attention and 9 modulation chunks)."""
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    parts = fx.from_latents(latents, noise, prompt="a cat", t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = []
    attention = fx.transformer.transformer_blocks[block].attn
    handle = attention.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(kwargs["hidden_states"]),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            noisy = fx.arch.noise_latents(latents, noise, T)
            fx.arch.run(noisy, T, fx.encode_prompt("a cat"))
    finally:
        handle.remove()
    torch.testing.assert_close(by_hand, seen[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.features.flatten(1).T, by_hand, rtol=0, atol=1e-5)


def test_dual_attention_layers_are_read_from_their_nine_chunk_modulation(fx, variant):
    linear = fx.transformer.transformer_blocks[0].norm1.linear
    assert linear.out_features == (9 if variant == "sd3.5" else 6) * WIDTH


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=1, device="cpu")
    image = photo(64, 64)
    settings = dict(t=T, ensemble=2, resolution=64, seed=3, progress=False)

    torch.testing.assert_close(partial(image, block=1, **settings), fx(image, block=1, **settings), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, block=2, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(tmp_path, variant):
    folder = build_sd3_pipeline(tmp_path / "pipeline", sd35=variant == "sd3.5", massive_channels=(3, 17))
    fx = DiTFeaturizer.from_pretrained(str(folder), device="cpu")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn((2, *LATENT_SHAPE[1:]), generator=gen)

    auto = fx.from_latents(latents, noise, t=T, block=1, discard="auto")
    explicit = fx.from_latents(latents, noise, t=T, block=1, discard=[17, 3])
    kept = fx.from_latents(latents, noise, t=T, block=1, discard=None)
    assert auto.discarded == [3, 17] and explicit.discarded == [3, 17] and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)
    with pytest.raises(InvalidArgumentError, match=f"0..{WIDTH - 1}"):
        fx.from_latents(latents, noise, t=T, block=1, discard=[WIDTH])


def test_noise_is_the_flow_matching_schedulers_own_at_the_same_timestep(fx):
    """The scheduler uses shift 3.0 for sampling; at any one of its timesteps t, sigma is t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(fx.text_pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    for t in scheduler.timesteps[[1, 5, 9]]:
        expected = scheduler.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(fx.arch.noise_latents(x0, noise, float(t)), expected, rtol=0, atol=1e-6)


def test_latents_are_shifted_then_scaled_by_the_vae_config(fx):
    raw = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(fx.arch.normalize_latents(raw), (raw - 0.0609) * 1.5305)


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_LAYERS - 1}"):
        fx(photo(64, 64), t=T, block=NUM_LAYERS, ensemble=1, resolution=64, progress=False)


def test_images_larger_than_the_positional_embedding_are_refused_with_the_limit(fx):
    limit = POS_EMBED_MAX_SIZE * 16
    with pytest.raises(InvalidArgumentError, match=f"at most {limit}"):
        fx(photo(64, 64), t=T, block=0, ensemble=1, resolution=limit + 16, progress=False)


def test_a_non_text_prompt_is_refused(fx):
    with pytest.raises(InvalidArgumentError, match="pass a string"):
        fx.encode_prompt(3)
