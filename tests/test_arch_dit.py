"""DiT (class-conditional) adapter: a tiny random DiTPipeline saved to disk and loaded the way users load it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_dit import NUM_CLASSES, NUM_LAYERS, SAMPLE_SIZE, build_dit_pipeline

T = 261.0
PIXELS = SAMPLE_SIZE * 8
"""The one image size the tiny model takes (64 px)."""
WIDTH = 16
LATENT_SHAPE = (1, 4, SAMPLE_SIZE, SAMPLE_SIZE)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipeline")


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def test_images_give_one_feature_map_per_image_on_the_16px_grid(fx):
    images = [photo(PIXELS, PIXELS, seed=0), photo(PIXELS, PIXELS, seed=1)]
    settings = dict(t=T, block=1, ensemble=2, resolution=PIXELS, progress=False)

    features = fx(images, seed=0, **settings)
    assert features.shape == (2, WIDTH, PIXELS // 16, PIXELS // 16)
    assert torch.equal(features, fx(images, seed=0, **settings))
    assert not torch.allclose(features, fx(images, seed=1, **settings))


@pytest.mark.parametrize("block", range(NUM_LAYERS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_self_attention(fx, block):
    """Shift and scale recomputed from the block's own timestep + label embedding are the block's own."""
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    parts = fx.from_latents(latents, noise, prompt=2, t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = []
    attention = fx.transformer.transformer_blocks[block].attn1
    handle = attention.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            noisy = fx.arch.noise_latents(latents, noise, T)
            fx.arch.run(noisy, T, fx.encode_prompt(2))
    finally:
        handle.remove()
    torch.testing.assert_close(by_hand, seen[0][0], rtol=0, atol=1e-5)


def test_the_class_is_the_null_class_by_default_or_an_index_or_a_label_name(fx):
    def label(prompt):
        return fx.encode_prompt(prompt)["class_labels"].tolist()

    assert label("") == label(None) == [NUM_CLASSES]
    assert label(1) == label("1") == label("goldfish") == label("Carassius auratus") == [1]
    assert label("white shark") == [2]
    with pytest.raises(InvalidArgumentError, match="not a class label.*'tench'"):
        fx.encode_prompt("unicorn")
    with pytest.raises(InvalidArgumentError, match=f"0..{NUM_CLASSES - 1}"):
        fx.encode_prompt(NUM_CLASSES + 1)


def test_the_class_changes_the_modulation_not_the_tapped_tokens_of_block_0(fx):
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    null, goldfish = (fx.from_latents(latents, noise, prompt=label, t=T, block=0, return_parts=True)
                      for label in ("", "goldfish"))
    assert torch.equal(null.raw, goldfish.raw)
    assert not torch.allclose(null.shift, goldfish.shift)


def test_images_must_have_the_models_one_size(fx):
    with pytest.raises(InvalidArgumentError, match=rf"only {PIXELS}x{PIXELS} px.*size=\({PIXELS}, {PIXELS}\)"):
        fx(photo(PIXELS, PIXELS * 3 // 4), t=T, block=0, ensemble=1, resolution=PIXELS, progress=False)
    padded = fx(photo(PIXELS, PIXELS * 3 // 4), t=T, block=0, ensemble=1, resolution=PIXELS, pad_square=True,
                progress=False)
    assert padded.shape == (1, WIDTH, PIXELS // 16, PIXELS // 16)


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=1, device="cpu")
    image = photo(PIXELS, PIXELS)
    settings = dict(t=T, ensemble=2, resolution=PIXELS, seed=3, progress=False)

    torch.testing.assert_close(partial(image, block=1, **settings), fx(image, block=1, **settings), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, block=2, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(tmp_path):
    folder = build_dit_pipeline(tmp_path / "pipeline", massive_channels=(4, 9))
    fx = DiTFeaturizer.from_pretrained(str(folder), device="cpu")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(LATENT_SHAPE, generator=gen), torch.randn((2, *LATENT_SHAPE[1:]), generator=gen)

    auto = fx.from_latents(latents, noise, t=T, block=1, discard="auto")
    explicit = fx.from_latents(latents, noise, t=T, block=1, discard=[9, 4])
    kept = fx.from_latents(latents, noise, t=T, block=1, discard=None)
    assert auto.discarded == [4, 9] and explicit.discarded == [4, 9] and kept.discarded == []
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


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_LAYERS - 1}"):
        fx(photo(PIXELS, PIXELS), t=T, block=NUM_LAYERS, ensemble=1, resolution=PIXELS, progress=False)
