"""Exact cosine matching at full image resolution without materialising upsampled features.

The published protocols (DIFT, DiTF, CleanDIFT) upsample a (C, h, w) feature map bilinearly
(`align_corners=False`) to the image size (H, W) and take, for every source keypoint, the argmax of
the cosine similarity over all H x W target pixels. At C=3072 and 500x375 that is 2.3 GB per image in
fp32. Bilinear upsampling is linear, so

* the dot product of a source vector with every upsampled target pixel is the bilinear upsampling of
  the low-resolution dot-product map, and
* the squared norm of an upsampled target pixel is a quadratic form in the Gram entries of its (at
  most) four low-resolution neighbours,

and the full-resolution cosine map follows exactly from a handful of (h, w) maps. The reference
path computes everything in float64, so cosines agree with the materialised computation to rounding
error; argmax is taken after rounding to float32 (see `match_prepared`). On devices that are slow at
float64 (most GPUs), `precision="float32"` computes the maps in float32 and re-checks in float64 the
few pixels that a rigorous error bound (`ditf.matching.float32_error`) cannot rule out, which gives
the same predictions.

Conventions: points are (x, y) pixel coordinates; sizes are (H, W); feature maps are (C, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError
from ditf.matching.points import check_points_inside
from ditf.matching.float32_error import float32_cosine_error_bound, float32_matmul_input_roundoff

# torch.nn.functional.normalize divides by max(norm, eps) with this eps; we do the same.
NORMALIZE_EPS = 1e-12
DEFAULT_POINT_CHUNK = 8
CHANNEL_BLOCK = 512
# Elements of one float64 temporary of the re-check (8 MB): bounds its memory when many pixels tie.
RECHECK_BLOCK_ELEMENTS = 2**20
# Absolute slack of the candidate test: 8 float32 ulps at 1. Covers the float32 rounding of the
# reference (ties within one ulp are broken by position) and of the test's own additions.
CANDIDATE_SLACK = 2.0**-20
# Compute capabilities of GPUs with full-rate float64 (A100: 8.0, H100: 9.0).
FAST_FLOAT64_CAPABILITIES = frozenset({(8, 0), (9, 0)})

Precision = Literal["auto", "float32", "float64"]


@dataclass(frozen=True)
class AxisWeights:
    """Bilinear (align_corners=False) interpolation weights of one axis, as PyTorch computes them.

    Output index o reads low-resolution indices `lower[o]` and `lower[o] + 1` with weights
    `w_lower[o]` and `w_upper[o]`. Index `lower + 1` may equal the input length: it addresses the
    replicated border of a map padded by one cell, which is exactly PyTorch's clamping.
    """

    lower: torch.Tensor  # (out,) int64
    w_lower: torch.Tensor  # (out,) float64
    w_upper: torch.Tensor  # (out,) float64


def axis_weights(in_size: int, out_size: int) -> AxisWeights:
    """Interpolation weights for resizing an axis of length `in_size` to `out_size`.

    Follows PyTorch's `upsample_bilinear2d` with `align_corners=False` and no scale factor:
    source = max((o + 0.5) * in / out - 0.5, 0), lower = floor(source), upper weight = source - lower.
    Returns per-output-index tensors of shape (out_size,).
    """
    if in_size < 1 or out_size < 1:
        raise InvalidArgumentError(
            f"axis sizes must be >= 1, got in_size={in_size}, out_size={out_size}; "
            "pass non-empty feature maps and image sizes"
        )
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    lower = source.floor().to(torch.int64)
    w_upper = source - lower.to(torch.float64)
    return AxisWeights(lower=lower, w_lower=1.0 - w_upper, w_upper=w_upper)


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Dense (out_size, in_size) float64 matrix R with upsample(v) = R @ v along one axis."""
    weights = axis_weights(in_size, out_size)
    upper = (weights.lower + 1).clamp(max=in_size - 1)
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows, weights.lower), weights.w_lower, accumulate=True)
    matrix.index_put_((rows, upper), weights.w_upper, accumulate=True)
    return matrix


def _pair_weight_matrices(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Products of one axis' interpolation weights, as dense matrices over the padded axis.

    `squares` (out, in + 1) holds w_lower^2 at `lower` and w_upper^2 at `lower + 1`; `cross`
    (out, in) holds w_lower * w_upper at `lower` (the pair lower, lower + 1).
    """
    weights = axis_weights(in_size, out_size)
    rows = torch.arange(out_size)
    squares = torch.zeros(out_size, in_size + 1, dtype=torch.float64)
    squares[rows, weights.lower] = weights.w_lower**2
    squares[rows, weights.lower + 1] = weights.w_upper**2
    cross = torch.zeros(out_size, in_size, dtype=torch.float64)
    cross[rows, weights.lower] = weights.w_lower * weights.w_upper
    return squares, cross


def _pad_replicate(feats: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (C, h + 1, w + 1) float64 with the last row and column repeated."""
    return F.pad(feats[None].to(torch.float64), (0, 1, 0, 1), mode="replicate")[0]


def _channel_slices(channels: int) -> list[slice]:
    # Blocks of channels keep float64 temporaries a few MB large (cache friendly, no page faults).
    return [slice(start, start + CHANNEL_BLOCK) for start in range(0, channels, CHANNEL_BLOCK)]


@dataclass(frozen=True)
class UpsampledTarget:
    """A target feature map prepared for exact full-resolution cosine matching.

    Holds the low-resolution features (dtype as given), the two axis interpolation matrices, the
    reciprocal norm of every upsampled pixel (H, W) and the norm ratio that scales the float32 error
    bound, all on one device. Build it once per target image with `prepare_target` and reuse it for
    every pair that has this image as its target.
    """

    feats: torch.Tensor  # (C, h, w)
    rows: torch.Tensor  # (H, h) float64
    cols: torch.Tensor  # (W, w) float64
    inv_norm: torch.Tensor  # (H, W) float64, 1 / max(||upsampled pixel||, eps)
    # (H, W) float32, rounded up: inv_norm * (bilinear mix of the low-resolution cell norms), >= 1.
    norm_ratio: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        """Full-resolution (H, W)."""
        return self.rows.shape[0], self.cols.shape[0]

    @property
    def device(self) -> torch.device:
        """Device holding every table of the target."""
        return self.feats.device


def upsampled_sq_norms(feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Squared L2 norm (H, W) of every pixel of `feats` (C, h, w) bilinearly upsampled to `size`.

    Exact: each upsampled pixel is a0*b0*t00 + a0*b1*t01 + a1*b0*t10 + a1*b1*t11, so its squared
    norm only needs the self, horizontal, vertical, diagonal and anti-diagonal Gram entries of the
    low-resolution map (with the last row and column replicated, which is PyTorch's border clamp).
    float64 throughout, on the device of `feats`; memory O(H * W + h * w * block).
    """
    height, width = size
    channels, h, w = feats.shape
    device = feats.device
    # Products are accumulated per channel slot over channel blocks and summed over slots at the end:
    # few large operations, no temporaries.
    slots = min(channels, CHANNEL_BLOCK)
    sq = torch.zeros(slots, h + 1, w + 1, dtype=torch.float64, device=device)
    horizontal = torch.zeros(slots, h + 1, w, dtype=torch.float64, device=device)
    vertical = torch.zeros(slots, h, w + 1, dtype=torch.float64, device=device)
    diagonal = torch.zeros(slots, h, w, dtype=torch.float64, device=device)
    anti_diagonal = torch.zeros(slots, h, w, dtype=torch.float64, device=device)
    for block in _channel_slices(channels):
        padded = _pad_replicate(feats[block])
        used = padded.shape[0]
        sq[:used].addcmul_(padded, padded)
        horizontal[:used].addcmul_(padded[:, :, :-1], padded[:, :, 1:])
        vertical[:used].addcmul_(padded[:, :-1, :], padded[:, 1:, :])
        diagonal[:used].addcmul_(padded[:, :-1, :-1], padded[:, 1:, 1:])
        anti_diagonal[:used].addcmul_(padded[:, :-1, 1:], padded[:, 1:, :-1])
    sq, horizontal, vertical = sq.sum(0), horizontal.sum(0), vertical.sum(0)
    diagonal, anti_diagonal = diagonal.sum(0), anti_diagonal.sum(0)

    # Each sum over neighbour pairs is separable: (row weights) @ table @ (column weights)^T.
    row_sq, row_cross = (m.to(device) for m in _pair_weight_matrices(h, height))
    col_sq, col_cross = (m.to(device) for m in _pair_weight_matrices(w, width))
    norms = (row_sq @ sq + 2 * row_cross @ vertical) @ col_sq.T
    norms += (2 * row_sq @ horizontal + 2 * row_cross @ (diagonal + anti_diagonal)) @ col_cross.T
    return norms.clamp(min=0.0)


def cell_norms(feats: torch.Tensor) -> torch.Tensor:
    """L2 norm (h, w) float64 of every low-resolution cell of `feats` (C, h, w), on its device."""
    _, h, w = feats.shape
    sq = torch.zeros(h, w, dtype=torch.float64, device=feats.device)
    for block in _channel_slices(feats.shape[0]):
        sq += feats[block].to(torch.float64).square().sum(0)
    return sq.sqrt()


def prepare_target(
    trg_feats: torch.Tensor, trg_size: tuple[int, int], device: torch.device | str | None = None
) -> UpsampledTarget:
    """Prepare `trg_feats` (C, h, w) for matching at full resolution `trg_size` (H, W).

    The features and every table live on `device` (default: the device of `trg_feats`); the tables
    are float64, so the device must support float64 (CPU and CUDA do, MPS does not). Memory on the
    device: the features plus about 20 bytes per full-resolution pixel.
    """
    _check_feats(trg_feats, "trg_feats")
    height, width = _check_size(trg_size, "trg_size")
    target_device = _check_device(trg_feats.device if device is None else device)
    feats = trg_feats.detach().to(target_device)
    rows = interpolation_matrix(feats.shape[1], height).to(target_device)
    cols = interpolation_matrix(feats.shape[2], width).to(target_device)
    inv_norm = 1.0 / upsampled_sq_norms(feats, (height, width)).sqrt().clamp(min=NORMALIZE_EPS)
    norm_ratio = (rows @ cell_norms(feats) @ cols.T).mul_(inv_norm).mul_(1.0 + 2.0**-20).to(torch.float32)
    return UpsampledTarget(feats=feats, rows=rows, cols=cols, inv_norm=inv_norm, norm_ratio=norm_ratio)


def upsampled_vectors(feats: torch.Tensor, size: tuple[int, int], points: torch.Tensor) -> torch.Tensor:
    """Feature vectors (P, C) float64 of `feats` (C, h, w) upsampled to `size` (H, W), read at
    integer pixel `points` (P, 2) given as (x, y), on the device of `feats`. Nothing of size H x W
    is materialised."""
    _check_feats(feats, "feats")
    height, width = _check_size(size, "size")
    points = _check_points(points, (height, width), "points").to(feats.device)
    _, h, w = feats.shape
    ry = _axis_weights_on(h, height, feats.device)
    rx = _axis_weights_on(w, width, feats.device)
    xs, ys = points[:, 0], points[:, 1]
    y0, x0 = ry.lower[ys], rx.lower[xs]
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    a0, a1 = ry.w_lower[ys], ry.w_upper[ys]
    b0, b1 = rx.w_lower[xs], rx.w_upper[xs]
    corners = feats[:, torch.cat([y0, y0, y1, y1]), torch.cat([x0, x1, x0, x1])].to(torch.float64)  # (C, 4P)
    weights = torch.cat([a0 * b0, a0 * b1, a1 * b0, a1 * b1])  # (4P,)
    return (corners * weights).reshape(-1, 4, len(points)).sum(1).T


def _axis_weights_on(in_size: int, out_size: int, device: torch.device) -> AxisWeights:
    weights = axis_weights(in_size, out_size)
    return AxisWeights(
        lower=weights.lower.to(device), w_lower=weights.w_lower.to(device), w_upper=weights.w_upper.to(device)
    )


def auto_precision(device: torch.device | str) -> Literal["float32", "float64"]:
    """The precision `precision="auto"` picks on `device`.

    "float64" on CPU and on GPUs with full-rate float64 (CUDA compute capability 8.0 or 9.0: A100,
    H100); "float32" with a float64 re-check elsewhere, since consumer and most data-centre GPUs run
    float64 at 1/32 to 1/64 of their float32 speed.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "float64"
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if tuple(torch.cuda.get_device_capability(index)) in FAST_FLOAT64_CAPABILITIES:
            return "float64"
    return "float32"


def _resolve_precision(precision: str, device: torch.device) -> Literal["float32", "float64"]:
    if precision not in ("auto", "float32", "float64"):
        raise InvalidArgumentError(
            f"precision must be 'auto', 'float32' or 'float64', got {precision!r}; "
            "'auto' picks float64 where the device is fast at it"
        )
    return auto_precision(device) if precision == "auto" else precision  # type: ignore[return-value]


def _unit_sources(src_vectors: torch.Tensor, target: UpsampledTarget) -> torch.Tensor:
    """L2-normalised source vectors (P, C) float64 on the target's device."""
    src = src_vectors.to(device=target.device, dtype=torch.float64)
    if src.ndim != 2 or src.shape[1] != target.feats.shape[0]:
        raise InvalidArgumentError(
            f"src_vectors must be (P, {target.feats.shape[0]}) to match the target's channels, "
            f"got {tuple(src.shape)}; extract both images with the same model and settings"
        )
    return src / src.norm(dim=1, keepdim=True).clamp(min=NORMALIZE_EPS)


def _low_res_dots(unit_src: torch.Tensor, target: UpsampledTarget, dtype: torch.dtype) -> torch.Tensor:
    """Dot products (P, h, w) in `dtype` of unit source vectors (P, C) with every low-resolution
    target cell."""
    channels, h, w = target.feats.shape
    src = unit_src.to(dtype)
    dots = torch.zeros(src.shape[0], h * w, dtype=dtype, device=target.device)
    for block in _channel_slices(channels):
        dots.addmm_(src[:, block], target.feats[block].reshape(-1, h * w).to(dtype))
    return dots.reshape(-1, h, w)


def _interpolated_cosines(
    low_res_dots: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, inv_norm: torch.Tensor
) -> torch.Tensor:
    """Full-resolution cosines (P, H, W) from low-resolution dots (P, h, w), in the inputs' dtype."""
    return (rows @ low_res_dots @ cols.T).mul_(inv_norm)


def _float32_tables(target: UpsampledTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return target.rows.float(), target.cols.float(), target.inv_norm.float()


def float32_error_map(target: UpsampledTarget) -> torch.Tensor:
    """Bound (H, W) float32 on |float32 cosine - float64 cosine| at every pixel of `target`, for the
    current float32 matmul settings of its device (see `ditf.matching.float32_error`)."""
    bound = float32_cosine_error_bound(
        target.feats.shape[0], CHANNEL_BLOCK, float32_matmul_input_roundoff(target.device)
    )
    return target.norm_ratio * bound.slope + bound.offset


def cosine_map_prepared(
    src_vectors: torch.Tensor, target: UpsampledTarget, precision: Precision = "float64"
) -> torch.Tensor:
    """Cosine similarity (P, H, W) of source vectors (P, C) with every pixel of a prepared target.

    float64 by default; float32 maps with `precision="float32"` (within `float32_error_map` of the
    float64 ones).
    """
    unit_src = _unit_sources(src_vectors, target)
    if _resolve_precision(precision, target.device) == "float64":
        dots = _low_res_dots(unit_src, target, torch.float64)
        return _interpolated_cosines(dots, target.rows, target.cols, target.inv_norm)
    return _interpolated_cosines(_low_res_dots(unit_src, target, torch.float32), *_float32_tables(target))


def match_prepared(
    src_vectors: torch.Tensor,
    target: UpsampledTarget,
    chunk: int = DEFAULT_POINT_CHUNK,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Argmax pixel (P, 2) as int64 (x, y) of each source vector (P, C) over a prepared target,
    on the target's device.

    The float64 cosines are rounded to float32, the precision at which the published protocols
    compare them, and ties go to the first pixel in row-major order (numpy/torch argmax). Without
    the rounding, differences far below float32 resolution (~6e-8) would pick a different pixel
    than the reference on near-flat maxima. At most `chunk` cosine maps of H x W are alive at once.

    `precision` says how the cosines are computed:

    * "float64": every cosine in float64 (the reference).
    * "float32": the maps in float32. Every pixel whose float32 cosine may, within the rigorous
      error bound `float32_error_map` (about 4e-4 x norm_ratio at C = 3072), reach the point's maximum is
      recomputed in float64 from float64 dots with its four cells, rounded to float32, and the
      first maximum in row-major order wins: the float64 path's prediction. (The two paths sum
      the same float64 terms in a different order; they could only disagree if a cosine lay within
      ~1e-15 of a float32 rounding boundary at the maximum.)
    * "auto": `auto_precision(target.device)`, float64 on CPU.
    """
    unit_src = _unit_sources(src_vectors, target)
    if _resolve_precision(precision, target.device) == "float64":
        return _match_float64(unit_src, target, chunk)
    return _match_float32_rechecked(unit_src, target, chunk)


def _match_float64(unit_src: torch.Tensor, target: UpsampledTarget, chunk: int) -> torch.Tensor:
    low_res_dots = _low_res_dots(unit_src, target, torch.float64)
    predictions = [torch.zeros(0, 2, dtype=torch.int64, device=target.device)]
    for start in range(0, low_res_dots.shape[0], chunk):
        cos = _interpolated_cosines(low_res_dots[start : start + chunk], target.rows, target.cols, target.inv_norm)
        ys, xs = torch.unravel_index(cos.to(torch.float32).flatten(1).argmax(dim=1), target.size)
        predictions.append(torch.stack([xs, ys], dim=1))
    return torch.cat(predictions)


def _match_float32_rechecked(unit_src: torch.Tensor, target: UpsampledTarget, chunk: int) -> torch.Tensor:
    tables = _float32_tables(target)
    error = float32_error_map(target)
    low_res_dots = _low_res_dots(unit_src, target, torch.float32)
    predictions = [torch.zeros(0, 2, dtype=torch.int64, device=target.device)]
    for start in range(0, low_res_dots.shape[0], chunk):
        cos = _interpolated_cosines(low_res_dots[start : start + chunk], *tables)
        # `lower` bounds each point's exact maximum from below (minus the slack); a pixel whose upper
        # bound cos + error stays below it cannot win.
        lower = (cos - error).flatten(1).amax(dim=1) - CANDIDATE_SLACK
        candidates = (cos.add_(error) >= lower[:, None, None]).nonzero()
        del cos
        predictions.append(_first_exact_maximum(unit_src[start : start + chunk], candidates, target))
    return torch.cat(predictions)


def _first_exact_maximum(unit_src: torch.Tensor, candidates: torch.Tensor, target: UpsampledTarget) -> torch.Tensor:
    """Among `candidates` (n, 3) (point, y, x), the (x, y) (P, 2) of each point's first pixel in
    row-major order with the largest float64 cosine rounded to float32."""
    point, ys, xs = candidates.unbind(1)
    height, width = target.size
    exact = _exact_cosines(unit_src, point, ys, xs, target).to(torch.float32)
    best = torch.full((unit_src.shape[0],), -torch.inf, device=target.device)
    best = best.scatter_reduce(0, point, exact, reduce="amax", include_self=False)
    no_pixel = height * width
    at_best = torch.where(exact == best[point], ys * width + xs, no_pixel)
    first = torch.full((unit_src.shape[0],), no_pixel, dtype=torch.int64, device=target.device)
    first = first.scatter_reduce(0, point, at_best, reduce="amin")
    if bool((first == no_pixel).any()):
        raise InvalidArgumentError(
            "cosines are not finite: the source or target features contain NaN or inf; "
            "check the feature extraction (e.g. float16 overflow)"
        )
    first_y, first_x = torch.unravel_index(first, target.size)
    return torch.stack([first_x, first_y], dim=1)


def _exact_cosines(
    unit_src: torch.Tensor, point: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, target: UpsampledTarget
) -> torch.Tensor:
    """float64 cosines (n,) of unit source vectors `unit_src[point]` ((P, C), L2-normalised) with the
    upsampled target pixels (`xs`, `ys`), all (n,) int64, each from the four low-resolution cells
    around the pixel: the float64 path's value up to summation order. Temporaries: O(n) plus
    blocks of RECHECK_BLOCK_ELEMENTS float64."""
    channels, h, w = target.feats.shape
    rows = _axis_weights_on(h, target.size[0], target.device)
    cols = _axis_weights_on(w, target.size[1], target.device)
    y0, x0 = rows.lower[ys], cols.lower[xs]
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    corners = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=1)  # (n, 4)
    # Neighbouring candidates share cells: one dot product per distinct (point, cell).
    keys, slot = torch.unique(point[:, None] * (h * w) + corners, return_inverse=True)
    key_point, key_cell = torch.unravel_index(keys, (unit_src.shape[0], h * w))
    flat_feats = target.feats.reshape(channels, h * w)
    block = max(1, min(CHANNEL_BLOCK, RECHECK_BLOCK_ELEMENTS // max(len(keys), 1)))
    dots = torch.zeros(len(keys), dtype=torch.float64, device=target.device)
    for start in range(0, channels, block):
        channel = slice(start, start + block)
        dots += (unit_src[key_point, channel] * flat_feats[channel, key_cell].T.to(torch.float64)).sum(1)
    d = dots[slot]
    a0, a1 = rows.w_lower[ys], rows.w_upper[ys]
    b0, b1 = cols.w_lower[xs], cols.w_upper[xs]
    # Rows first, then columns, like rows @ dots @ cols.T on the float64 path.
    left, right = a0 * d[:, 0] + a1 * d[:, 2], a0 * d[:, 1] + a1 * d[:, 3]
    return (b0 * left + b1 * right) * target.inv_norm[ys, xs]


def cosine_map(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_points: torch.Tensor,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
) -> torch.Tensor:
    """Full-resolution cosine maps (P, H_trg, W_trg), float64, for heat maps.

    `src_feats` (C, h, w) and `trg_feats` (C, h', w') are upsampled (bilinear, align_corners=False)
    to `src_size` and `trg_size` (H, W) implicitly; `src_points` (P, 2) are integer (x, y) pixels
    of the source image. Equal to upsample-then-cosine up to float rounding.
    """
    _check_pair(src_feats, trg_feats)
    vectors = upsampled_vectors(src_feats, src_size, torch.as_tensor(src_points))
    return cosine_map_prepared(vectors, prepare_target(trg_feats, trg_size))


def match_points(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_points: torch.Tensor,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    chunk: int = DEFAULT_POINT_CHUNK,
    precision: Precision = "auto",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predicted target pixels (P, 2) int64 (x, y) for integer source pixels `src_points` (P, 2).

    Same predictions as `upsample_then_match` (the DIFT/DiTF protocol: bilinear upsampling of both
    maps to the image sizes (H, W), cosine argmax) without allocating C x H x W; memory is
    O(chunk * H * W + C * h * w). Computed on `device` (default: the device of `trg_feats`) at
    `precision` (see `match_prepared`); the result is on that device.
    """
    _check_pair(src_feats, trg_feats)
    target = prepare_target(trg_feats, trg_size, device=device)
    vectors = upsampled_vectors(src_feats.to(target.device), src_size, torch.as_tensor(src_points))
    return match_prepared(vectors, target, chunk=chunk, precision=precision)


def upsample_then_match(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_points: torch.Tensor,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    return_cosine: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation: materialise both upsampled maps (C, H, W) in `dtype`, then match.

    Returns predicted target pixels (P, 2) int64 (x, y); with `return_cosine` also the cosine maps
    (P, H_trg, W_trg). Slow and memory hungry by design: used by tests and the benchmark only.
    """
    _check_pair(src_feats, trg_feats)
    src_h, src_w = _check_size(src_size, "src_size")
    trg_h, trg_w = _check_size(trg_size, "trg_size")
    points = _check_points(torch.as_tensor(src_points), (src_h, src_w), "src_points")
    src_up = F.interpolate(src_feats[None].to(dtype), size=(src_h, src_w), mode="bilinear", align_corners=False)[0]
    trg_up = F.interpolate(trg_feats[None].to(dtype), size=(trg_h, trg_w), mode="bilinear", align_corners=False)[0]
    channels = trg_up.shape[0]
    src_vectors = F.normalize(src_up[:, points[:, 1], points[:, 0]].T, dim=1)  # (P, C)
    del src_up
    trg_vectors = F.normalize(trg_up.reshape(channels, -1).T, dim=1)  # (H*W, C)
    del trg_up
    cos = (src_vectors @ trg_vectors.T).reshape(-1, trg_h, trg_w)
    ys, xs = torch.unravel_index(cos.flatten(1).argmax(dim=1), (trg_h, trg_w))
    predictions = torch.stack([xs, ys], dim=1)
    return (predictions, cos) if return_cosine else predictions


def match_points_lowres(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_cells: torch.Tensor,
) -> torch.Tensor:
    """Patch-level matching (SD-DINO / GeoAware-SC hard argmax): cosine argmax over the target's
    low-resolution grid. `src_cells` (P, 2) are integer (col, row) grid cells; returns (P, 2) int64
    (col, row) cells of the target grid."""
    _check_pair(src_feats, trg_feats)
    _, h, w = src_feats.shape
    cells = torch.as_tensor(src_cells).to(torch.int64)
    outside = (cells[:, 0] < 0) | (cells[:, 0] >= w) | (cells[:, 1] < 0) | (cells[:, 1] >= h)
    if bool(outside.any()):
        raise InvalidArgumentError(
            f"src_cells must lie in the {w}x{h} source grid, got {cells.tolist()}; "
            "convert pixels to cells with floor(x * w / W)"
        )
    src = F.normalize(src_feats.to(torch.float64)[:, cells[:, 1], cells[:, 0]].T, dim=1)
    trg = F.normalize(trg_feats.to(torch.float64).flatten(1).T, dim=1)
    rows, cols = torch.unravel_index((src @ trg.T).argmax(dim=1), trg_feats.shape[1:])
    return torch.stack([cols, rows], dim=1)


def _check_feats(feats: torch.Tensor, name: str) -> None:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or min(feats.shape) < 1:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise InvalidArgumentError(f"{name} must be a non-empty (C, h, w) tensor, got {shape}; drop the batch axis")
    if not feats.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a floating-point tensor, got dtype {feats.dtype}")


def _check_pair(src_feats: torch.Tensor, trg_feats: torch.Tensor) -> None:
    _check_feats(src_feats, "src_feats")
    _check_feats(trg_feats, "trg_feats")
    if src_feats.shape[0] != trg_feats.shape[0]:
        raise InvalidArgumentError(
            f"src_feats has {src_feats.shape[0]} channels but trg_feats has {trg_feats.shape[0]}; "
            "extract both images with the same model and settings"
        )


def _check_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "mps":
        raise InvalidArgumentError(
            "device 'mps' has no float64, which the exact matcher's tables need; "
            "prepare targets with device='cpu' (or a CUDA device)"
        )
    return device


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise InvalidArgumentError(f"{name} must be (H, W) with positive sides, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_points(points: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    if points.ndim != 2 or points.shape[1] != 2:
        raise InvalidArgumentError(f"{name} must be (P, 2) (x, y) pixels, got shape {tuple(points.shape)}")
    if points.is_floating_point():
        if not torch.equal(points, points.floor()):
            raise InvalidArgumentError(
                f"{name} must be integer pixels, got {points.tolist()}; take floor() of sub-pixel keypoints"
            )
    points = points.to(torch.int64)
    check_points_inside(points, size, name)
    return points
