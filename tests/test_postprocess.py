"""The DiTF post-processing steps against hand-written formulas."""

import pytest
import torch

from ditf.errors import InvalidArgumentError
from ditf.features.postprocess import (
    adaln_modulate,
    discard_channels,
    ditf_features,
    ensemble_mean,
    layer_norm,
)


def test_ensemble_mean_averages_members():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(ensemble_mean(x), (x[0] + x[1]) / 2)


def test_layer_norm_has_no_affine_and_eps_1e_6():
    x = torch.randn(5, 8)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(layer_norm(x), (x - mean) / torch.sqrt(var + 1e-6), atol=1e-6)


def test_modulation_is_one_plus_scale_times_x_plus_shift():
    x, shift, scale = torch.randn(5, 8), torch.randn(8), torch.randn(8)
    assert torch.allclose(adaln_modulate(x, shift, scale), (1 + scale) * x + shift)


def test_discard_zeroes_only_the_given_channels_and_copies():
    x = torch.ones(3, 6)
    out = discard_channels(x, [1, 4])
    assert out[:, [1, 4]].abs().sum() == 0 and out[:, [0, 2, 3, 5]].eq(1).all()
    assert x.eq(1).all()


def test_ditf_order_is_discard_then_norm_then_modulate():
    raw, shift, scale = torch.randn(10, 8), torch.randn(8), torch.randn(8)
    raw[:, 3] += 500.0
    expected = raw.clone()
    expected[:, 3] = 0
    expected = (1 + scale) * torch.nn.functional.layer_norm(expected, (8,), eps=1e-6) + shift
    assert torch.allclose(ditf_features(raw, shift, scale, [3]), expected, atol=1e-6)
    assert torch.equal(ditf_features(raw, shift, scale, normalize=False, modulate=False), raw)


def test_channel_out_of_range_names_the_valid_range():
    with pytest.raises(InvalidArgumentError, match=r"\[64\].*0\.\.63"):
        discard_channels(torch.zeros(2, 64), [3, 64])
