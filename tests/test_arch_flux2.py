"""FLUX.2 adapter (klein and dev): what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from ditf.taps import block_pre_hook
from tiny_flux2 import LATENT_CHANNELS, NUM_DOUBLE, PROMPT
from tiny_models import latents_and_noise, photo

T = 261.0
TEXT_TOKENS = 512
"""Both pipelines pad prompts to 512 tokens."""
LATENT_SHAPE = (1, LATENT_CHANNELS, 4, 3)
"""A 64x48 px image: 8x6 VAE cells, patchified 2x2 into 4x3 cells of 16 px, one token each."""


@pytest.fixture(params=["klein", "dev"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def fx(tiny_featurizer, variant) -> DiTFeaturizer:
    return tiny_featurizer(f"flux2-{variant}")


def test_latents_are_the_pipelines_own_patchified_batch_norm_latents(fx):
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = fx.arch.encode_images(pixels, None, torch.Generator())
        theirs = fx.text_pipeline._encode_vae_image(pixels, torch.Generator())
    assert ours.shape == LATENT_SHAPE and fx.arch.stride == 16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_single_blocks_read_outside_a_recorded_call_explain_what_to_do(fx):
    block = fx.arch.block(NUM_DOUBLE)
    latents, noise = latents_and_noise(LATENT_SHAPE)
    tokens = fx.arch.noise_latents(latents, noise, T).flatten(2).transpose(1, 2)
    embeds = fx.encode_prompt(PROMPT)["prompt_embeds"]
    zero = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), block_pre_hook(block, lambda args, kwargs: fx.arch.read_block_inputs(block, args, kwargs)):
        with pytest.raises(InvalidArgumentError, match="forward_context"):
            fx.transformer(hidden_states=tokens, encoder_hidden_states=embeds, timestep=torch.tensor([T / 1000]),
                           img_ids=torch.cartesian_prod(zero, torch.arange(4), torch.arange(3), zero),
                           txt_ids=torch.cartesian_prod(zero, zero, zero, torch.arange(TEXT_TOKENS)),
                           guidance=torch.tensor([4.0]))


def test_guidance_is_embedded_by_dev_only(fx, variant):
    latents, noise = latents_and_noise(LATENT_SHAPE)
    features = {g: fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=1, guidance=g).features for g in (None, 1.0, 4.0)}
    torch.testing.assert_close(features[None], features[4.0], rtol=0, atol=0)  # the default is Flux2Pipeline's 4.0
    assert torch.equal(features[1.0], features[4.0]) == (variant == "klein")


def test_the_pipeline_class_follows_the_variant_when_building_from_modules(fx, variant):
    pipe = fx.text_pipeline
    assert fx.arch.pipeline_class == type(pipe).__name__ == ("Flux2KleinPipeline" if variant == "klein" else "Flux2Pipeline")
    built = DiTFeaturizer(fx.transformer, fx.vae, text_encoders=[pipe.text_encoder], tokenizers=[pipe.tokenizer])
    settings = dict(t=T, block=NUM_DOUBLE, ensemble=1, resolution=64, progress=False)
    assert torch.equal(built(photo(64, 48), PROMPT, **settings)[0], fx(photo(64, 48), PROMPT, **settings)[0])


def test_vae_latents_default_to_the_posterior_mode_as_flux2_pipeline_encodes_images(fx):
    settings = fx.settings(t=T, block=1, ensemble=2, resolution=64)
    assert settings.vae_sample == "mode" and settings.sources["vae_sample"] == "flux2 family default"
    latents = fx.noisy_latents(photo(64, 48), settings)
    with torch.no_grad():
        mode = fx.arch.encode_images(latents.prepared.pixels, None, torch.Generator())
    assert latents.clean.shape[0] == 1 and torch.equal(latents.clean, mode)
