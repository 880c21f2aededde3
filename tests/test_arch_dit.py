"""DiT (class-conditional) adapter: what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_dit import NUM_CLASSES, SAMPLE_SIZE, WIDTH
from tiny_models import latents_and_noise, photo

T = 261.0
PIXELS = SAMPLE_SIZE * 8
"""The one image size the tiny model takes (64 px)."""
LATENT_SHAPE = (1, 4, SAMPLE_SIZE, SAMPLE_SIZE)


@pytest.fixture
def fx(tiny_featurizer) -> DiTFeaturizer:
    return tiny_featurizer("dit")


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
    latents, noise = latents_and_noise(LATENT_SHAPE)
    null, goldfish = (fx.from_latents(latents, noise, prompt=label, t=T, block=0, return_parts=True)
                      for label in ("", "goldfish"))
    assert torch.equal(null.raw, goldfish.raw)
    assert not torch.allclose(null.shift, goldfish.shift)


def test_latents_are_scaled_by_the_vae_config(fx):
    raw = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(fx.arch.normalize_latents(raw), raw * 0.18215)


def test_images_must_have_the_models_one_size(fx):
    with pytest.raises(InvalidArgumentError, match=rf"only {PIXELS}x{PIXELS} px.*size=\({PIXELS}, {PIXELS}\)"):
        fx(photo(PIXELS, PIXELS * 3 // 4), t=T, block=0, ensemble=1, resolution=PIXELS, progress=False)
    padded = fx(photo(PIXELS, PIXELS * 3 // 4), t=T, block=0, ensemble=1, resolution=PIXELS, pad_square=True,
                progress=False)
    assert padded[0].shape == (WIDTH, PIXELS // 16, PIXELS // 16)
