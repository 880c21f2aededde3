"""Qwen-Image adapter: a tiny random pipeline saved to disk and loaded the way users load it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_models import randomize
from tiny_qwen_image import LATENT_CHANNELS, NUM_LAYERS, PROMPT, TEXT_HIDDEN, WIDTH, build_qwen_image_pipeline

T = 261.0
LATENT_SHAPE = (1, LATENT_CHANNELS, 8, 6)
"""A 64x48 px image: 8x6 latent cells of 8 px, packed 2x2 into 4x3 tokens."""


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_qwen_image_pipeline(tmp_path_factory.mktemp("qwen_image") / "pipeline")


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def latents_and_noise(ensemble: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(LATENT_SHAPE, generator=gen), torch.randn((ensemble, *LATENT_SHAPE[1:]), generator=gen)


def test_images_give_one_feature_map_per_image_on_the_16px_grid(fx):
    images = [photo(64, 48, seed=0), photo(64, 48, seed=1)]
    settings = dict(t=T, block=1, ensemble=2, resolution=64, progress=False)

    features = fx(images, PROMPT, seed=0, **settings)
    assert features.shape == (2, WIDTH, 64 // 16, 48 // 16)
    assert torch.equal(features, fx(images, PROMPT, seed=0, **settings))
    assert not torch.allclose(features, fx(images, PROMPT, seed=1, **settings))


def test_a_vae_sample_is_the_img2img_pipelines_own_normalised_latent(fx):
    """One posterior sample of the 5-D video VAE, per-channel normalised, equals what
    QwenImageImg2ImgPipeline encodes from the same pixels and generator seed."""
    from diffusers import QwenImageImg2ImgPipeline

    img2img = QwenImageImg2ImgPipeline.from_pipe(fx.text_pipeline)
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = fx.arch.encode_images(pixels, 1, torch.Generator().manual_seed(5))
        theirs = img2img._encode_vae_image(pixels.unsqueeze(2), torch.Generator().manual_seed(5))
    assert ours.shape == LATENT_SHAPE
    torch.testing.assert_close(ours, theirs.squeeze(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("block", range(NUM_LAYERS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_joint_attention(fx, block):
    """(1 + scale) * LN(z_k) + shift from the parts (chunks 0-2 of img_mod) equals the image input of the
    block's joint attention."""
    latents, noise = latents_and_noise()
    parts = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = []
    attention = fx.transformer.transformer_blocks[block].attn
    handle = attention.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            fx.arch.run(fx.arch.noise_latents(latents, noise, T), T, fx.encode_prompt(PROMPT))
    finally:
        handle.remove()
    torch.testing.assert_close(by_hand, seen[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.features.flatten(1).T, by_hand, rtol=0, atol=1e-5)


def test_zero_cond_t_models_modulate_reference_image_tokens_with_their_own_vectors():
    """Edit-2511-style models (zero_cond_t) modulate reference-image tokens with t = 0: the adapter returns
    per-token (shift, scale), and the block's attention input still matches them token by token."""
    from diffusers import QwenImageTransformer2DModel

    from ditf.arch import arch_for
    from ditf.taps import tap_block

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6), zero_cond_t=True,
    )
    randomize(transformer, seed=1).eval()
    arch = arch_for(transformer)
    target_and_reference = torch.randn(1, 2 * 12, 4 * LATENT_CHANNELS)
    seen = []
    handle = transformer.transformer_blocks[1].attn.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad(), tap_block(arch, 1, stop=False) as captured:
            transformer(hidden_states=target_and_reference, encoder_hidden_states=torch.randn(1, 5, TEXT_HIDDEN),
                        timestep=torch.tensor([0.3]), img_shapes=[[(1, 4, 3), (1, 4, 3)]], return_dict=False)
    finally:
        handle.remove()
    parts = captured[0]
    assert parts.shift.shape == parts.scale.shape == (1, 24, WIDTH)
    assert not torch.allclose(parts.shift[0, 0], parts.shift[0, 12])
    by_hand = F.layer_norm(parts.image, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift
    torch.testing.assert_close(by_hand, seen[0], rtol=0, atol=1e-5)


def test_prompt_embeds_with_a_padding_mask_equal_the_unpadded_prompt(fx):
    cond = fx.encode_prompt(PROMPT)
    embeds = cond["prompt_embeds"]
    assert embeds.shape[0::2] == (1, TEXT_HIDDEN) and cond["prompt_embeds_mask"] is None  # no padding: no mask
    padded = torch.cat([embeds, torch.randn(1, 7, TEXT_HIDDEN) * 10], dim=1)
    mask = torch.cat([torch.ones(1, embeds.shape[1]), torch.zeros(1, 7)], dim=1).long()
    latents, noise = latents_and_noise()

    reference = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_LAYERS - 1).features
    masked = fx.from_latents(latents, noise, prompt_embeds=padded, prompt_embeds_mask=mask, t=T, block=NUM_LAYERS - 1)
    unmasked = fx.from_latents(latents, noise, prompt_embeds=padded, t=T, block=NUM_LAYERS - 1)
    torch.testing.assert_close(masked.features, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked.features, reference, atol=1e-3)


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=1, device="cpu")
    image = photo(64, 48)
    settings = dict(t=T, ensemble=2, resolution=64, seed=3, progress=False)

    torch.testing.assert_close(partial(image, PROMPT, block=1, **settings), fx(image, PROMPT, block=1, **settings),
                               rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, PROMPT, block=2, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(tmp_path):
    folder = build_qwen_image_pipeline(tmp_path / "pipeline", massive_channels=(5, 20))
    fx = DiTFeaturizer.from_pretrained(str(folder), device="cpu")
    latents, noise = latents_and_noise(ensemble=2)

    auto = fx.from_latents(latents, noise, t=T, block=1, discard="auto")
    explicit = fx.from_latents(latents, noise, t=T, block=1, discard=[20, 5])
    kept = fx.from_latents(latents, noise, t=T, block=1, discard=None)
    assert auto.discarded == [5, 20] and explicit.discarded == [5, 20] and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)


def test_noise_is_the_flow_matching_schedulers_own_at_the_same_timestep(fx):
    """At any one of the scheduler's timesteps t (shifted for sampling), sigma is t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(fx.text_pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    x0, noise = latents_and_noise()
    for t in scheduler.timesteps[[1, 5, 9]]:
        expected = scheduler.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(fx.arch.noise_latents(x0, noise, float(t)), expected, rtol=0, atol=1e-6)


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_LAYERS - 1}"):
        fx(photo(64, 64), PROMPT, t=T, block=NUM_LAYERS, ensemble=1, resolution=64, progress=False)


def test_a_non_text_prompt_is_refused(fx):
    with pytest.raises(InvalidArgumentError, match="pass a string"):
        fx.encode_prompt(3)
