"""SD3 / SD3.5 adapter: what differs from the other families (see test_arch_common.py for the rest)."""

from __future__ import annotations

import pytest
import torch

from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError
from tiny_models import photo
from tiny_sd3 import POS_EMBED_MAX_SIZE, WIDTH

T = 261.0


@pytest.fixture(params=["sd3", "sd3.5"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def fx(tiny_featurizer, variant) -> DiTFeaturizer:
    return tiny_featurizer(variant)


def test_dual_attention_layers_are_read_from_their_nine_chunk_modulation(fx, variant):
    linear = fx.transformer.transformer_blocks[0].norm1.linear
    assert linear.out_features == (9 if variant == "sd3.5" else 6) * WIDTH


def test_latents_are_shifted_then_scaled_by_the_vae_config(fx):
    raw = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(fx.arch.normalize_latents(raw), (raw - 0.0609) * 1.5305)


def test_images_larger_than_the_positional_embedding_are_refused_with_the_limit(fx):
    limit = POS_EMBED_MAX_SIZE * 16
    with pytest.raises(InvalidArgumentError, match=f"at most {limit}"):
        fx(photo(64, 64), t=T, block=0, ensemble=1, resolution=limit + 16, progress=False)
