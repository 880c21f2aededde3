"""FLUX.2 adapter (klein and dev): tiny random pipelines saved to disk and loaded the way users load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from ditf.taps import block_pre_hook
from tiny_flux2 import LATENT_CHANNELS, NUM_DOUBLE, NUM_SINGLE, PROMPT, WIDTH, build_flux2_pipeline

T = 261.0
NUM_BLOCKS = NUM_DOUBLE + NUM_SINGLE
TEXT_TOKENS = 512
"""Both pipelines pad prompts to 512 tokens."""
LATENT_SHAPE = (1, LATENT_CHANNELS, 4, 3)
"""A 64x48 px image: 8x6 VAE cells, patchified 2x2 into 4x3 cells of 16 px, one token each."""


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image (height, width, 3) in [0, 1]."""
    return np.random.RandomState(seed).rand(height, width, 3)


@pytest.fixture(scope="module", params=["klein", "dev"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, variant) -> Path:
    return build_flux2_pipeline(tmp_path_factory.mktemp(f"flux2_{variant}") / "pipeline", variant=variant)


@pytest.fixture(scope="module")
def fx(folder) -> DiTFeaturizer:
    return DiTFeaturizer.from_pretrained(str(folder), device="cpu")


def latents_and_noise(ensemble: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(LATENT_SHAPE, generator=gen), torch.randn((ensemble, *LATENT_SHAPE[1:]), generator=gen)


def attention_input(fx: DiTFeaturizer, block: int, latents: torch.Tensor, noise: torch.Tensor,
                    hook=None) -> torch.Tensor:
    """What block `block` feeds its attention, (N, C): image tokens only (single blocks see [text, image])."""
    ref = fx.arch.block(block)
    seen = []
    handle = ref.module.attn.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]),
                                                       with_kwargs=True)
    try:
        with torch.no_grad(), block_pre_hook(ref, hook or (lambda args, kwargs: None)):
            fx.arch.run(fx.arch.noise_latents(latents, noise, T), T, fx.encode_prompt(PROMPT))
    finally:
        handle.remove()
    return seen[0][0]


def test_images_give_one_feature_map_per_image_on_the_16px_grid(fx):
    images = [photo(64, 48, seed=0), photo(64, 48, seed=1)]
    settings = dict(t=T, block=NUM_DOUBLE, ensemble=2, resolution=64, progress=False)

    features = fx(images, PROMPT, seed=0, **settings)
    assert features.shape == (2, WIDTH, 64 // 16, 48 // 16)
    assert torch.equal(features, fx(images, PROMPT, seed=0, **settings))
    assert not torch.allclose(features, fx(images, PROMPT, seed=1, **settings))


def test_latents_are_the_pipelines_own_patchified_batch_norm_latents(fx):
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = fx.arch.encode_images(pixels, None, torch.Generator())
        theirs = fx.text_pipeline._encode_vae_image(pixels, torch.Generator())
    assert ours.shape == LATENT_SHAPE and fx.arch.stride == 16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block", range(NUM_BLOCKS))
def test_tap_modulated_by_hand_is_what_the_block_feeds_its_attention(fx, block):
    """(1 + scale) * LN(z_k) + shift from the parts (the shared model-level modulation) equals the image part
    of the block's attention input, in double blocks and in the [text, image] stream of single blocks."""
    latents, noise = latents_and_noise()
    parts = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=block, discard=None, return_parts=True)
    tokens = parts.raw.flatten(1).T
    by_hand = F.layer_norm(tokens, (WIDTH,), eps=1e-6) * (1 + parts.scale) + parts.shift

    seen = attention_input(fx, block, latents, noise)
    image_part = seen if block < NUM_DOUBLE else seen[TEXT_TOKENS:]
    assert image_part.shape == by_hand.shape
    torch.testing.assert_close(by_hand, image_part, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.features.flatten(1).T, by_hand, rtol=0, atol=1e-5)


def test_a_replaced_image_stream_is_written_into_the_single_block_slice(fx):
    """Zeroing the image tokens entering a single block leaves its text tokens alone: the attention then sees
    LN(0) * (1 + scale) + shift = shift for every image token and the unchanged text part."""
    latents, noise = latents_and_noise()
    block = fx.arch.block(NUM_DOUBLE)
    shift = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_DOUBLE, return_parts=True).shift

    def zero_image(args, kwargs):
        image = fx.arch.read_block_inputs(block, args, kwargs).image
        return fx.arch.replace_image_input(block, args, kwargs, torch.zeros_like(image))

    original = attention_input(fx, NUM_DOUBLE, latents, noise)
    replaced = attention_input(fx, NUM_DOUBLE, latents, noise, hook=zero_image)
    assert replaced.shape == original.shape
    torch.testing.assert_close(replaced[:TEXT_TOKENS], original[:TEXT_TOKENS], rtol=0, atol=0)
    torch.testing.assert_close(replaced[TEXT_TOKENS:], shift.expand(12, WIDTH), rtol=0, atol=1e-6)


def test_single_blocks_read_outside_a_recorded_call_explain_what_to_do(fx):
    block = fx.arch.block(NUM_DOUBLE)
    latents, noise = latents_and_noise()
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
    latents, noise = latents_and_noise()
    features = {g: fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=1, guidance=g).features for g in (None, 1.0, 4.0)}
    torch.testing.assert_close(features[None], features[4.0], rtol=0, atol=0)  # the default is Flux2Pipeline's 4.0
    assert torch.equal(features[1.0], features[4.0]) == (variant == "klein")


def test_the_pipeline_class_follows_the_variant_when_building_from_modules(fx, variant):
    pipe = fx.text_pipeline
    assert fx.arch.pipeline_class == type(pipe).__name__ == ("Flux2KleinPipeline" if variant == "klein" else "Flux2Pipeline")
    built = DiTFeaturizer(fx.transformer, fx.vae, text_encoders=[pipe.text_encoder], tokenizers=[pipe.tokenizer])
    settings = dict(t=T, block=NUM_DOUBLE, ensemble=1, resolution=64, progress=False)
    assert torch.equal(built(photo(64, 48), PROMPT, **settings), fx(photo(64, 48), PROMPT, **settings))


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, folder):
    partial = DiTFeaturizer.from_pretrained(str(folder), block=NUM_DOUBLE, device="cpu")
    image = photo(64, 48)
    settings = dict(t=T, ensemble=2, resolution=64, seed=3, progress=False)

    torch.testing.assert_close(partial(image, PROMPT, block=NUM_DOUBLE, **settings),
                               fx(image, PROMPT, block=NUM_DOUBLE, **settings), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="was not loaded"):
        partial(image, PROMPT, block=NUM_DOUBLE + 1, **settings)


def test_discard_auto_finds_channels_injected_into_the_residual_stream(fx):
    """FLUX.2 projections have no bias, so the test adds a constant to two channels of the image-token
    embedding with a forward hook; a single block then sees them in its image slice."""
    def inject(_module, _args, output):
        output = output.clone()
        output[..., [4, 9]] += 1000.0
        return output

    latents, noise = latents_and_noise(ensemble=2)
    handle = fx.transformer.x_embedder.register_forward_hook(inject)
    try:
        auto = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_BLOCKS - 1, discard="auto")
        explicit = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_BLOCKS - 1, discard=[9, 4])
        kept = fx.from_latents(latents, noise, prompt=PROMPT, t=T, block=NUM_BLOCKS - 1, discard=None)
    finally:
        handle.remove()
    assert auto.discarded == [4, 9] and explicit.discarded == [4, 9] and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)


def test_noise_is_the_flow_matching_schedulers_own_at_the_same_timestep(fx):
    """At any one of the scheduler's (dynamically shifted) timesteps t, sigma is t / 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(fx.text_pipeline.scheduler.config)
    scheduler.set_timesteps(10, mu=0.8)
    x0, noise = latents_and_noise()
    for t in scheduler.timesteps[[1, 5, 9]]:
        expected = scheduler.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(fx.arch.noise_latents(x0, noise, float(t)), expected, rtol=0, atol=1e-6)


def test_out_of_range_block_names_the_valid_range(fx):
    with pytest.raises(InvalidArgumentError, match=rf"valid blocks are 0\.\.{NUM_BLOCKS - 1}"):
        fx(photo(64, 64), PROMPT, t=T, block=NUM_BLOCKS, ensemble=1, resolution=64, progress=False)


def test_a_non_text_prompt_is_refused(fx):
    with pytest.raises(InvalidArgumentError, match="pass a string"):
        fx.encode_prompt(3)
