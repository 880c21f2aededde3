"""FLUX.1 adapter: what differs from the other families (see test_arch_common.py for the rest; the reference
parity is test_parity_flux.py, the featurizer's options test_featurizer_flux.py)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer


@pytest.fixture
def fx(tiny_featurizer) -> DiTFeaturizer:
    return tiny_featurizer("flux")


def test_a_vae_sample_is_the_img2img_pipelines_own_shifted_and_scaled_latent(fx):
    """One posterior sample, `(z - shift_factor) * scaling_factor`, equals what FluxImg2ImgPipeline encodes from
    the same pixels and generator seed; the tiny VAE has the released VAE's non-zero shift."""
    from diffusers import FluxImg2ImgPipeline

    img2img = FluxImg2ImgPipeline.from_pipe(fx.text_pipeline)
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = fx.arch.encode_images(pixels, 1, torch.Generator().manual_seed(5))
        theirs = img2img._encode_vae_image(pixels, torch.Generator().manual_seed(5))
    assert ours.shape == (1, 16, 8, 6) and fx.vae.config.shift_factor != 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_run_packs_latents_2x2_as_the_pipeline_does(fx):
    """The tokens `run` hands the transformer are `FluxPipeline._pack_latents` of the latents."""
    from diffusers import FluxPipeline

    latents = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = fx.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]),
                                                      with_kwargs=True)
    try:
        with torch.no_grad():
            fx.arch.run(latents, 261.0, fx.encode_prompt("a cat"))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], FluxPipeline._pack_latents(latents, 1, 16, 8, 6), rtol=0, atol=0)
