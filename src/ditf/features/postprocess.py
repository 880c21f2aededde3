"""DiTF post-processing: pure functions over tensors, computed in fp32.

The DiTF order of operations (Gan et al. 2025, the authors' `eval_spair.py`) is
ensemble mean of the raw block input -> channel discard -> LayerNorm without affine -> AdaLN modulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError

LAYER_NORM_EPS = 1e-6
"""eps of the DiT blocks' own affine-free LayerNorm (FLUX, SD3, PixArt, DiT, Sana, Qwen-Image)."""


def ensemble_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the ensemble axis: (E, N, C) -> (N, C), in fp32."""
    return x.float().mean(dim=0)


def discard_channels(x: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Copy of x (..., C) with the given channels set to zero (DiTF "channel discard")."""
    channels = check_channels(channels, x.shape[-1])
    out = x.float().clone()
    if channels:
        out[..., channels] = 0.0
    return out


def layer_norm(x: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """LayerNorm over the last axis without affine parameters: (..., C) -> (..., C), fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation `(1 + scale) * x + shift`; x (N, C), shift/scale (C,) or (N, C); fp32."""
    return x.float() * (1.0 + scale.float()) + shift.float()


def ditf_features(raw: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, discard: Sequence[int] = (),
                  normalize: bool = True, modulate: bool = True) -> torch.Tensor:
    """DiTF feature of ensemble-mean block input `raw` (N, C): discard -> LayerNorm -> modulate.

    `normalize=False, modulate=False` gives the raw feature (the paper's 29.9 PCK row), `modulate=False`
    the LayerNorm-only ablation. Modulation without normalisation is allowed but is not a paper variant.
    """
    x = discard_channels(raw, discard)
    if normalize:
        x = layer_norm(x)
    if modulate:
        x = adaln_modulate(x, shift, scale)
    return x


def check_channels(channels: Sequence[int], width: int) -> list[int]:
    """Channel indices as a sorted list of ints; raise when one is not an integer in 0..width-1."""
    bad = [c for c in channels if isinstance(c, bool) or not hasattr(c, "__index__") or not 0 <= int(c) < width]
    if bad:
        raise InvalidArgumentError(
            f"channel indices {bad} are out of range: this model has {width} channels (0..{width - 1})."
        )
    return sorted({int(c) for c in channels})
