"""What every family adapter must do, checked on each family's tiny pipeline loaded the way users load it.

Like diffusers' model tester mixins: each test is written once and runs over every row of
`tiny_families.FAMILIES` (each family and variant); `test_arch_<family>.py` files add only what differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F

from ditf import DiTFeaturizer
from ditf.arch import BlockInputs
from ditf.errors import InvalidArgumentError
from ditf.taps import block_pre_hook, tap_block
from tiny_families import FAMILY_LIST, TinyFamily
from tiny_models import latents_and_noise as seeded_latents_and_noise, photo

T = 261.0
BLOCK_LAYER_NORM_EPS = 1e-6
"""Every family's blocks normalise z_k with an affine-free LayerNorm of this eps before modulating it."""


@pytest.fixture(params=FAMILY_LIST, ids=[family.name for family in FAMILY_LIST])
def family(request) -> TinyFamily:
    return request.param


@pytest.fixture
def fx(family, tiny_featurizer) -> DiTFeaturizer:
    return tiny_featurizer(family.name)


def latents_and_noise(fx: DiTFeaturizer, family: TinyFamily, ensemble: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded clean latents (1, c, H, W) and noise (ensemble, c, H, W) whose token grid is `family.grid`."""
    h, w = family.grid
    p = fx.arch.patch_size
    return seeded_latents_and_noise((1, fx.arch.latent_channels, h * p, w * p), ensemble)


def run_recording(fx: DiTFeaturizer, family: TinyFamily, latents: torch.Tensor, noise: torch.Tensor,
                  edit: tuple[int, Callable[[tuple, dict], tuple[tuple, dict] | None]] | None = None,
                  ) -> tuple[dict[int, BlockInputs], dict[int, torch.Tensor]]:
    """One full forward of the family's own `run` at T, recording for every block k what the adapter reads
    from its call (`BlockInputs`) and the `hidden_states` (B, N_txt + N_img or N_img, C) its attention
    receives. `edit = (k, hook)` runs `hook` as a pre-hook on block k's call (see `block_pre_hook`)."""
    attention_inputs: dict[int, torch.Tensor] = {}

    def recorder(k: int):
        def record(_module, args: tuple, kwargs: dict) -> None:
            attention_inputs.setdefault(k, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return record

    blocks = fx.arch.blocks()
    with torch.no_grad(), ExitStack() as hooks:
        for ref in blocks:
            attention = getattr(ref.module, family.attention)
            hooks.callback(attention.register_forward_pre_hook(recorder(ref.index), with_kwargs=True).remove)
        taps = [hooks.enter_context(tap_block(fx.arch, ref.index, stop=False)) for ref in blocks]
        if edit is not None:
            hooks.enter_context(block_pre_hook(fx.arch.block(edit[0]), edit[1]))
        fx.arch.run(fx.arch.noise_latents(latents, noise, T), T, fx.encode_prompt(family.prompt))
    return {k: captured[0] for k, captured in enumerate(taps)}, attention_inputs


def modulated(inputs: BlockInputs) -> torch.Tensor:
    """(1 + scale) * LN(z) + shift of the first image in `inputs`, (N_img, C)."""
    normed = F.layer_norm(inputs.image[0], inputs.image.shape[-1:], eps=BLOCK_LAYER_NORM_EPS)
    return normed * (1 + inputs.scale[0]) + inputs.shift[0]


def test_features_are_one_map_per_image_at_the_stride_and_follow_the_seed(fx, family):
    """Each image's noise depends only on the seed and the image, so one image alone gets the features it got
    in a batch; another seed gives other features."""
    images = [photo(*family.image, seed=0), photo(*family.image, seed=1)]
    settings = dict(t=T, block=family.num_blocks - 1, ensemble=2, resolution=family.resolution, progress=False)

    features = fx(images, family.prompt, seed=0, **settings)
    assert fx.arch.stride == family.stride
    assert [f.shape for f in features] == [(family.width, *family.grid)] * 2
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in features)
    assert torch.equal(features[1], fx(images[1:], family.prompt, seed=0, **settings)[0])
    assert not torch.allclose(features[1], fx(images[1:], family.prompt, seed=1, **settings)[0])


def test_tap_modulated_by_hand_is_what_every_block_feeds_its_attention(fx, family):
    """(1 + scale) * LN(z_k) + shift from what the adapter reads equals the image tokens (the last N) of
    block k's attention input, for every k; the featurizer's parts and features (discard=None) are the same."""
    latents, noise = latents_and_noise(fx, family)
    block_inputs, attention_inputs = run_recording(fx, family, latents, noise)
    n_image = family.grid[0] * family.grid[1]
    for k in range(family.num_blocks):
        seen = attention_inputs[k][0]
        assert seen.shape[0] >= n_image, f"block {k}"
        torch.testing.assert_close(seen[-n_image:], modulated(block_inputs[k]), rtol=0, atol=1e-5,
                                   msg=lambda m, k=k: f"block {k}: {m}")

    last = block_inputs[family.num_blocks - 1]
    parts = fx.from_latents(latents, noise, prompt=family.prompt, t=T, block=family.num_blocks - 1, discard=None,
                            return_parts=True)
    torch.testing.assert_close(parts.raw.flatten(1).T, last.image[0], rtol=0, atol=0)
    torch.testing.assert_close((parts.shift, parts.scale), (last.shift[0], last.scale[0]), rtol=0, atol=0)
    torch.testing.assert_close(parts.features.flatten(1).T, modulated(last), rtol=0, atol=1e-5)


def test_a_replaced_image_stream_is_what_the_block_then_uses(fx, family):
    """Zeroed image tokens written back into the last block's call reach its attention as
    LN(0) * (1 + scale) + shift = shift, and the text tokens the attention also sees stay as they were."""
    latents, noise = latents_and_noise(fx, family)
    k = family.num_blocks - 1
    block = fx.arch.block(k)

    def zero_image(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        image = fx.arch.read_block_inputs(block, args, kwargs).image
        return fx.arch.replace_image_input(block, args, kwargs, torch.zeros_like(image))

    block_inputs, original = run_recording(fx, family, latents, noise)
    _, replaced = run_recording(fx, family, latents, noise, edit=(k, zero_image))
    original, replaced = original[k][0], replaced[k][0]
    n_image = family.grid[0] * family.grid[1]
    assert replaced.shape == original.shape
    torch.testing.assert_close(replaced[:-n_image], original[:-n_image], rtol=0, atol=0)
    shift = block_inputs[k].shift[0].expand(n_image, family.width)
    torch.testing.assert_close(replaced[-n_image:], shift, rtol=0, atol=1e-6)


def test_loading_up_to_block_k_gives_the_same_features_and_refuses_later_blocks(fx, family, tiny_pipeline_dir):
    k = family.num_blocks - 2
    partial = DiTFeaturizer.from_pretrained(str(tiny_pipeline_dir(family.name)), block=k, device="cpu")
    image = photo(*family.image)
    settings = dict(t=T, ensemble=1, resolution=family.resolution, seed=3, progress=False)

    torch.testing.assert_close(partial(image, family.prompt, block=k, **settings)[0],
                               fx(image, family.prompt, block=k, **settings)[0], rtol=0, atol=0)
    assert sum(p.numel() for p in partial.transformer.parameters()) < sum(p.numel() for p in fx.transformer.parameters())
    with pytest.raises(InvalidArgumentError, match=rf"was not loaded.*block={k + 1}"):
        partial(image, family.prompt, block=k + 1, **settings)


def test_discard_auto_finds_massive_channels_and_explicit_lists_work(fx, family):
    """Channels made massive in the image stream (a constant added to the image embedding's output) are
    found by discard="auto" at the last block (in FLUX and FLUX.2, inside the joint [text, image] stream)."""
    def inject(_module, _args, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., list(family.massive)] += 1000.0
        return output

    latents, noise = latents_and_noise(fx, family)
    k = family.num_blocks - 1
    massive = sorted(family.massive)
    handle = fx.transformer.get_submodule(family.embedder).register_forward_hook(inject)
    try:
        auto, explicit, kept = (fx.from_latents(latents, noise, prompt=family.prompt, t=T, block=k, discard=discard)
                                for discard in ("auto", massive[::-1], None))
    finally:
        handle.remove()
    assert auto.discarded == massive and explicit.discarded == massive and kept.discarded == []
    torch.testing.assert_close(auto.features, explicit.features, rtol=0, atol=0)
    assert not torch.allclose(auto.features, kept.features)
    with pytest.raises(InvalidArgumentError, match=rf"0\.\.{family.width - 1}"):
        fx.from_latents(latents, noise, prompt=family.prompt, t=T, block=k, discard=[family.width])


def test_noise_is_the_family_schedulers_own(fx, family):
    """`noise_latents` at t equals the noising of the scheduler the family's pipeline ships with."""
    x0, noise = latents_and_noise(fx, family)
    points, atol = family.noised_by(fx.text_pipeline.scheduler.config, x0, noise)
    for t, expected in points:
        torch.testing.assert_close(fx.arch.noise_latents(x0, noise, t), expected, rtol=0, atol=atol,
                                   msg=lambda m, t=t: f"t={t}: {m}")


def test_an_out_of_range_block_names_the_valid_range_and_the_block_lists(fx, family):
    layout, start = [], 0
    for stage, count in family.blocks.items():
        layout.append(f"{start}-{start + count - 1} = {stage}[0-{count - 1}]")
        start += count
    expected = f"valid blocks are 0..{family.num_blocks - 1} ({'; '.join(layout)})"
    with pytest.raises(InvalidArgumentError, match=re.escape(expected)):
        fx(photo(*family.image), family.prompt, t=T, block=family.num_blocks, ensemble=1, resolution=family.resolution,
           progress=False)


TEXT_FAMILIES = [family for family in FAMILY_LIST if family.text]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_a_prompt_that_is_not_text_is_refused(fx, family):
    with pytest.raises(InvalidArgumentError, match="pass a string"):
        fx.encode_prompt(3)
