"""A rigorous bound on the error of full-resolution cosines computed in float32.

`ditf.matching.correspondence` computes a cosine map in float32 as

    cos(p) = [sum_ij a_i b_j D_ij] * inv_norm(p),   D_ij = s . t_ij

where s (C,) is the unit source vector, t_ij (C,) the (at most) four low-resolution target cells
around pixel p, a_i, b_j >= 0 the bilinear weights of rows and columns and inv_norm(p) the float64
reciprocal norm of the upsampled pixel. With n_ij = ||t_ij||, |D_ij| <= n_ij (Cauchy-Schwarz) and
the standard bounds for floating-point sums (Higham, Accuracy and Stability of Numerical Algorithms,
ch. 3; gamma(n) = n u / (1 - n u), valid for any summation order, blocked or with FMA):

* dots: s and t are rounded to float32 (u each) and possibly to the matmul unit's input precision
  (v each, see `float32_matmul_input_roundoff`); C products are summed over B-channel blocks,
  so |D32_ij - D_ij| <= e_dot n_ij with e_dot = (1 + u)^2 (1 + v)^2 (1 + gamma(C + C/B + 1)) - 1;
* each interpolation pass (rows, then columns) sums two non-zero products of a float32 weight
  (u, then v) and an operand (v): a factor e_pass = (1 + u)(1 + v)^2 (1 + gamma(2)) - 1;
* so |numerator32 - numerator| <= e_num sum_ij a_i b_j n_ij, e_num = (1 + e_dot)(1 + e_pass)^2 - 1;
* rounding inv_norm to float32 and the final product add (1 + u)^2, and |cos| <= 1.

Hence |cos32(p) - cos(p)| <= slope * ratio(p) + offset with ratio(p) = inv_norm(p) sum_ij a_i b_j n_ij
(>= 1; 1 where the neighbouring cells are parallel, large only where they cancel), slope =
e_num (1 + u)^2 and offset = (1 + u)^2 - 1. The float64 reference itself obeys the same bound with
u = v = 2^-53, which is added. To first order slope ~ (C + C/B + 11) u + 6 v (1.8e-4 at C = 3072,
B = 512 in IEEE float32). Both terms are doubled to absorb the float32 evaluation of the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditf.errors import InvalidArgumentError

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FLOAT64_UNIT_ROUNDOFF = 2.0**-53
TF32_UNIT_ROUNDOFF = 2.0**-11  # 10 stored mantissa bits
BFLOAT16_UNIT_ROUNDOFF = 2.0**-8  # 7 stored mantissa bits
SAFETY_FACTOR = 2.0


@dataclass(frozen=True)
class CosineErrorBound:
    """|float32 cosine - float64 cosine| <= slope * ratio(p) + offset at every pixel p (unitless)."""

    slope: float
    offset: float


def _gamma(terms: int, roundoff: float) -> float:
    return terms * roundoff / (1.0 - terms * roundoff)


def _relative_error(channels: int, channel_block: int, unit: float, input_unit: float) -> tuple[float, float]:
    """(slope, offset) of the error of the interpolated cosine computed at unit roundoff `unit`."""
    sums = channels + -(-channels // channel_block) + 1
    dot = (1 + unit) ** 2 * (1 + input_unit) ** 2 * (1 + _gamma(sums, unit)) - 1
    interpolation_pass = (1 + unit) * (1 + input_unit) ** 2 * (1 + _gamma(2, unit)) - 1
    numerator = (1 + dot) * (1 + interpolation_pass) ** 2 - 1
    return numerator * (1 + unit) ** 2, (1 + unit) ** 2 - 1


def float32_cosine_error_bound(
    channels: int, channel_block: int, input_roundoff: float = FLOAT32_UNIT_ROUNDOFF
) -> CosineErrorBound:
    """Bound on the float32 cosine error against the float64 cosine, for dot products over
    `channels` channels accumulated in blocks of `channel_block` channels.

    `input_roundoff` is the unit roundoff to which the matmul unit may round float32 operands (2^-24
    in IEEE float32, 2^-11 with TF32, 2^-8 with bfloat16 passes). See the module docstring.
    """
    limit = int(0.25 / FLOAT32_UNIT_ROUNDOFF)
    if not 1 <= channels <= limit or channel_block < 1:
        raise InvalidArgumentError(
            f"float32 matching needs 1 <= channels <= {limit} and channel_block >= 1, got channels={channels}, "
            f"channel_block={channel_block}; use precision='float64' for wider features"
        )
    input_roundoff = max(input_roundoff, FLOAT32_UNIT_ROUNDOFF)
    slope32, offset32 = _relative_error(channels, channel_block, FLOAT32_UNIT_ROUNDOFF, input_roundoff)
    slope64, offset64 = _relative_error(channels, channel_block, FLOAT64_UNIT_ROUNDOFF, FLOAT64_UNIT_ROUNDOFF)
    return CosineErrorBound(
        slope=SAFETY_FACTOR * (slope32 + slope64), offset=SAFETY_FACTOR * (offset32 + offset64)
    )


def float32_matmul_input_roundoff(device: torch.device) -> float:
    """Unit roundoff to which float32 matmul operands may be rounded on `device` under the current
    torch settings: 2^-24 for IEEE float32, 2^-11 when TF32 is allowed ("high"), 2^-8 when bfloat16
    passes are allowed ("medium")."""
    modes = {torch.get_float32_matmul_precision()}
    backends = torch.backends
    if device.type == "cuda":
        modes.add(getattr(backends.cuda.matmul, "fp32_precision", "none"))
        if backends.cuda.matmul.allow_tf32:
            modes.add("tf32")
    elif device.type == "cpu" and hasattr(backends, "mkldnn") and hasattr(backends.mkldnn, "matmul"):
        modes.add(getattr(backends.mkldnn.matmul, "fp32_precision", "none"))
    if modes & {"medium", "bf16"}:
        return BFLOAT16_UNIT_ROUNDOFF
    if modes & {"high", "tf32"}:
        return TF32_UNIT_ROUNDOFF
    return FLOAT32_UNIT_ROUNDOFF
