"""Sana adapter: a tiny random pipeline saved to disk and loaded the way users load it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.taps import block_pre_hook
from tiny_sana import LATENT_CHANNELS, NUM_LAYERS, PROMPT, WIDTH, build_sana_pipeline

T = 261.0
LATENT_SHAPE = (1, LATENT_CHANNELS, 4, 3)
"""A 128x96 px image: 4x3 latent cells of 32 px, one token each."""


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def latents_and_noise(ensemble: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(LATENT_SHAPE, generator=gen), torch.randn((ensemble, *LATENT_SHAPE[1:]), generator=gen)


def test_images_give_one_feature_map_per_image_on_the_32px_grid(fx):
    images = [photo(128, 96, seed=0), photo(128, 96, seed=1)]
    settings = dict(t=T, block=1, ensemble=2, resolution=128, progress=False)

    features = fx(images, PROMPT, seed=0, **settings)
    assert features.shape == (2, WIDTH, 128 // 32, 96 // 32)
    assert torch.equal(features, fx(images, PROMPT, seed=0, **settings))
    assert not torch.allclose(features, fx(images, PROMPT, seed=1, **settings))


def test_the_dc_autoencoder_is_deterministic_so_vae_sampling_modes_agree(fx):
    settings = dict(t=T, block=1, ensemble=2, resolution=128, progress=False)
    per_member, mode = (fx(photo(128, 96), PROMPT, vae_sample=m, **settings) for m in ("per_member", "mode"))
    assert torch.equal(per_member, mode)


def test_latents_are_the_dc_latent_times_the_scaling_factor(fx):
    pixels = torch.rand(1, 3, 128, 96) * 2 - 1
    with torch.no_grad():
        expected = fx.vae.encode(pixels).latent * 0.41407
        torch.testing.assert_close(fx.arch.encode_images(pixels, 4, torch.Generator()), expected)
    assert expected.shape == LATENT_SHAPE and fx.arch.stride == 32


@pytest.mark.parametrize("block", range(NUM_LAYERS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_self_attention(fx, block):
    """(1 + scale) * LN(z_k) + shift from the parts (scale_shift_table + the shared t6 vector) equals the
    self-attention input of block k, which is called positionally."""
    latents, noise = latents_and_noise()
    parts = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = []
    attention = fx.transformer.transformer_blocks[block].attn1
    handle = attention.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            fx.arch.run(fx.arch.noise_latents(latents, noise, T), T, fx.encode_prompt(PROMPT))
    finally:
        handle.remove()
    torch.testing.assert_close(by_hand, seen[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.features.flatten(1).T, by_hand, rtol=0, atol=1e-5)


def test_a_replaced_image_stream_reaches_the_positionally_called_block(fx):
    """Zeroed image tokens entering block 1 reach its self-attention as LN(0) * (1 + scale) + shift = shift."""
    latents, noise = latents_and_noise()
    block = fx.arch.block(1)
    shift = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=1, return_parts=True).shift

    def zero_image(args, kwargs):
        image = fx.arch.read_block_inputs(block, args, kwargs).image
        return fx.arch.replace_image_input(block, args, kwargs, torch.zeros_like(image))

    seen = []
    handle = block.module.attn1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), block_pre_hook(block, zero_image):
            fx.arch.run(fx.arch.noise_latents(latents, noise, T), T, fx.encode_prompt(PROMPT))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0][0], shift.expand(12, WIDTH), rtol=0, atol=1e-6)


def test_the_prompt_mask_reaches_the_cross_attention(fx):
    """Padding positions (mask 0) of the Gemma embeddings cannot change the features of a later block."""
    cond = fx.encode_prompt(PROMPT)
    embeds, mask = cond["prompt_embeds"], cond["prompt_attention_mask"]
    assert embeds.shape == (1, 300, 32) and mask.shape == (1, 300) and 0 < mask.sum() < 300
    scrambled = torch.where(mask[..., None].bool(), embeds, torch.randn_like(embeds) * 10)
    latents, noise = latents_and_noise()

    def features(prompt_embeds):
        return fx.from_latents(latents, noise, prompt_embeds=prompt_embeds, prompt_attention_mask=mask, t=T,
                               block=NUM_LAYERS - 1).features

    torch.testing.assert_close(features(scrambled), features(embeds), rtol=0, atol=1e-5)
    assert torch.equal(features(embeds), fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_LAYERS - 1).features)
    with pytest.raises(InvalidArgumentError, match="prompt_attention_mask"):
        fx.from_latents(latents, noise, prompt_embeds=embeds, t=T, block=0)


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=1, device="cpu")
    image = photo(128, 96)
    settings = dict(t=T, ensemble=2, resolution=128, seed=3, progress=False)

    torch.testing.assert_close(partial(image, PROMPT, block=1, **settings), fx(image, PROMPT, block=1, **settings),
                               rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, PROMPT, block=2, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(tmp_path):
    folder = build_sana_pipeline(tmp_path / "pipeline", massive_channels=(3, 11))
    fx = DiTFeaturizer.from_pretrained(str(folder), device="cpu")
    latents, noise = latents_and_noise(ensemble=2)

    auto = fx.from_latents(latents, noise, t=T, block=1, discard="auto")
    explicit = fx.from_latents(latents, noise, t=T, block=1, discard=[11, 3])
    kept = fx.from_latents(latents, noise, t=T, block=1, discard=None)
    assert auto.discarded == [3, 11] and explicit.discarded == [3, 11] and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)


def test_noise_is_the_flow_dpm_solvers_own_at_the_same_sigma(fx):
    """The released scheduler is DPM-Solver with flow sigmas; its `add_noise` at each of its steps equals
    our flow noising at t = 1000 * sigma of that step."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(fx.text_pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    x0, noise = latents_and_noise()
    for step in (1, 5, 9):
        expected = scheduler.add_noise(x0, noise[0:1], scheduler.timesteps[step:step + 1])
        sigma = float(scheduler.sigmas[step])
        torch.testing.assert_close(fx.arch.noise_latents(x0, noise, 1000 * sigma), expected, rtol=0, atol=1e-6)


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_LAYERS - 1}"):
        fx(photo(64, 64), PROMPT, t=T, block=NUM_LAYERS, ensemble=1, resolution=64, progress=False)


def test_a_non_text_prompt_is_refused(fx):
    with pytest.raises(InvalidArgumentError, match="pass a string"):
        fx.encode_prompt(3)


def test_sana_sprint_checkpoints_are_refused_at_load():
    from diffusers import SanaTransformer2DModel

    from ditf.arch import arch_for

    sprint = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                    caption_channels=8, sample_size=4, guidance_embeds=True)
    with pytest.raises(UnsupportedLayoutError, match="Sana-Sprint"):
        arch_for(sprint)
