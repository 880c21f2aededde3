"""Qwen-Image adapter: what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from tiny_models import latents_and_noise, randomize
from tiny_qwen_image import LATENT_CHANNELS, NUM_LAYERS, PROMPT, TEXT_HIDDEN, WIDTH

T = 261.0
LATENT_SHAPE = (1, LATENT_CHANNELS, 8, 6)
"""A 64x48 px image: 8x6 latent cells of 8 px, packed 2x2 into 4x3 tokens."""


@pytest.fixture
def fx(tiny_featurizer) -> DiTFeaturizer:
    return tiny_featurizer("qwen-image")


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


def test_run_packs_latents_2x2_as_the_pipeline_does(fx):
    """The tokens `run` hands the transformer are `QwenImagePipeline._pack_latents` of the latents."""
    from diffusers import QwenImagePipeline

    latents, _ = latents_and_noise(LATENT_SHAPE)
    seen = []
    handle = fx.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]),
                                                      with_kwargs=True)
    try:
        with torch.no_grad():
            fx.arch.run(latents, T, fx.encode_prompt(PROMPT))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], QwenImagePipeline._pack_latents(latents, *LATENT_SHAPE), rtol=0, atol=0)


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
    latents, noise = latents_and_noise(LATENT_SHAPE)

    reference = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_LAYERS - 1).features
    masked = fx.from_latents(latents, noise, prompt_embeds=padded, prompt_embeds_mask=mask, t=T, block=NUM_LAYERS - 1)
    unmasked = fx.from_latents(latents, noise, prompt_embeds=padded, t=T, block=NUM_LAYERS - 1)
    torch.testing.assert_close(masked.features, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(unmasked.features, reference, atol=1e-3)
