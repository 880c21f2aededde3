"""DiTF + DINOv2 fusion for one image pair: both maps on one grid, PCA fitted on the pair, weighted concatenation.

The DiTF paper's strongest correspondence rows ("†": SPair-71k 72.2, AP-10K cross-species 69.4) fuse DiTF
with DINOv2 features "by PCA to 1280 dimensions" (its Eq. 14); the paper does not publish the weights, the
dimension split or the normalisation. The recipe here is SD-DINO's (Zhang et al. 2023, "A Tale of Two
Features", github.com/Junyi42/sd-dino @b85df18: `co_pca` in utils/utils_correspondence.py and the fusion in
pck_spair_pascal.py), with a DiTF map in place of SD-DINO's three Stable Diffusion layers:

1. PCA per part, fitted jointly on the source and target tokens of the pair (SD-DINO's `co_pca`): tokens of
   both maps at their own grid are centred by their joint mean and projected on the top `dims` principal
   axes. SD-DINO reduces the diffusion part (3 x 256) and keeps DINOv2 whole (`CO_PCA_DINO` 0); the default
   `dims=(512, None)` does the same and gives 512 + 768 = 1280 channels with DINOv2 ViT-B/14, the paper's
   output dimension (the split itself is our inference).
2. Both parts brought to one grid per image by bilinear resizing (align_corners=False), the coarser map to the
   finer one's grid, as SD-DINO upsamples its coarser layers to the finest.
3. L2 normalisation of each part per location, after PCA (SD-DINO normalises the reduced diffusion
   descriptor and the DINOv2 descriptor separately when it fuses).
4. Weights per part (SD-DINO `WEIGHT` 1 and 1; its paper writes alpha = 0.5 for both, the same up to scale)
   and concatenation [DiTF, DINOv2] along channels.

SD-DINO's PCA is `torch.pca_lowrank` (randomised); here it is exact by default (an eigendecomposition in
float64 with a fixed sign per axis), so the same pair always gives the same fused maps; `pca="lowrank"` is
SD-DINO's randomised PCA with a fixed seed (approximate; for fidelity to SD-DINO).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError
from ditf.features.fusion_settings import LOWRANK_ITERATIONS, FusionSettings

__all__ = ["FusionSettings", "co_pca", "fuse", "fuse_pair", "principal_axes"]


def principal_axes(tokens: torch.Tensor, count: int, method: str = "exact", seed: int = 0) -> torch.Tensor:
    """The top `count` principal axes (C, count) float64 of centred `tokens` (N, C), strongest first.

    Each axis is signed so that its entry of largest magnitude is positive (scikit-learn's convention; among
    entries equal up to rounding, the first), so the result depends neither on the solver's sign choice nor on
    the order of the channels. Axes beyond the rank of the tokens are zero columns.
    method "exact" takes the eigenvectors of the smaller of tokensᵀ·tokens (C x C) and tokens·tokensᵀ
    (N x N); "lowrank" is `torch.pca_lowrank` seeded with `seed`.
    """
    tokens = tokens.to(torch.float64)
    rows, channels = tokens.shape
    usable = min(count, rows, channels)
    if method == "lowrank":
        with torch.random.fork_rng(devices=[tokens.device] if tokens.device.type == "cuda" else []):
            torch.manual_seed(seed)
            _, _, axes = torch.pca_lowrank(tokens, q=usable, center=False, niter=LOWRANK_ITERATIONS)
    elif channels <= rows:
        values, vectors = torch.linalg.eigh(tokens.T @ tokens)
        axes = vectors[:, values.argsort(descending=True)[:usable]]
    else:
        values, vectors = torch.linalg.eigh(tokens @ tokens.T)
        order = values.argsort(descending=True)[:usable]
        scales = values[order].clamp(min=0).sqrt()
        kept = scales > scales[0] * 1e-10
        axes = (tokens.T @ vectors[:, order]) / torch.where(kept, scales, torch.ones_like(scales))
        axes = axes * kept
    magnitude = axes.abs()
    leading = (magnitude >= (1 - 1e-9) * magnitude.amax(dim=0, keepdim=True)).to(torch.int8).argmax(dim=0)
    signs = torch.sign(axes[leading, torch.arange(axes.shape[1], device=axes.device)])
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    if usable < count:
        axes = torch.cat([axes, axes.new_zeros(channels, count - usable)], dim=1)
    return axes


def co_pca(source: torch.Tensor, target: torch.Tensor, dims: int, method: str = "exact",
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (C, h_s, w_s) and target (C, h_t, w_t) maps projected on the top `dims` principal axes of their
    tokens taken together, after centring by the joint mean: (dims, h_s, w_s) and (dims, h_t, w_t), float64.

    SD-DINO's `co_pca`, exact (`principal_axes`); the two maps may have different grids.
    """
    channels = source.shape[0]
    if dims > channels:
        raise InvalidArgumentError(f"PCA to {dims} dimensions needs maps with at least {dims} channels, but these have "
                                   f"{channels}; pass fewer dims (at most {channels}), or None to keep the part whole.")
    tokens = torch.cat([source.flatten(1), target.flatten(1)], dim=1).T.to(torch.float64)  # (N_s + N_t, C)
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    reduced = (centred @ principal_axes(centred, dims, method, seed)).T  # (dims, N_s + N_t)
    split = source.shape[1] * source.shape[2]
    return (reduced[:, :split].reshape(dims, *source.shape[1:]),
            reduced[:, split:].reshape(dims, *target.shape[1:]))


def _resized(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(features.shape[1:]) == tuple(size):
        return features
    return F.interpolate(features[None], size=size, mode="bilinear", align_corners=False)[0]


def _common_grid(ditf: torch.Tensor, dino: torch.Tensor, grid: str) -> tuple[int, int]:
    if grid == "ditf":
        return tuple(ditf.shape[1:])
    if grid == "dino":
        return tuple(dino.shape[1:])
    ditf_cells, dino_cells = ditf.shape[1] * ditf.shape[2], dino.shape[1] * dino.shape[2]
    return tuple(dino.shape[1:]) if dino_cells > ditf_cells else tuple(ditf.shape[1:])


def _check_maps(maps: dict[str, object]) -> None:
    for name, value in maps.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or min(value.shape) < 1 \
                or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidArgumentError(f"fuse: {name} must be a floating-point (C, h, w) feature map, got {shape}.")
    for part in ("ditf", "dino"):
        source, target = maps[f"{part}_src"], maps[f"{part}_trg"]
        if source.shape[0] != target.shape[0]:
            raise InvalidArgumentError(
                f"fuse: {part}_src has {source.shape[0]} channels but {part}_trg has {target.shape[0]}; both images of "
                "a pair must be described by the same model and settings: re-extract one of them.")


def fuse(ditf_src: torch.Tensor, ditf_trg: torch.Tensor, dino_src: torch.Tensor, dino_trg: torch.Tensor, *,
         weights: tuple[float, float] = (1.0, 1.0), dims: tuple[int | None, int | None] = (512, None),
         normalize: str = "after", grid: str = "finer", pca: str = "exact",
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused maps of a source and a target image from their DiTF and DINOv2 maps (see the module docstring).

    Args:
        ditf_src, ditf_trg: DiTF maps (C_d, h, w) of the source and target image (any grids).
        dino_src, dino_trg: DINOv2 maps (C_n, h', w') of the same two images.
        weights, dims, normalize, grid, pca, seed: see `FusionSettings` (defaults: SD-DINO's, 512 + whole).

    Returns:
        (fused_src, fused_trg): float32 (D, h_s, w_s) and (D, h_t, w_t) on the inputs' device, D = dims[0] (or
        C_d) + dims[1] (or C_n), each image on its common grid (`grid`), channels [DiTF part, DINOv2 part].
    """
    settings = FusionSettings(weights=weights, dims=dims, normalize=normalize, grid=grid, pca=pca, seed=seed)
    _check_maps({"ditf_src": ditf_src, "ditf_trg": ditf_trg, "dino_src": dino_src, "dino_trg": dino_trg})
    grids = (_common_grid(ditf_src, dino_src, settings.grid), _common_grid(ditf_trg, dino_trg, settings.grid))
    fused: list[list[torch.Tensor]] = [[], []]
    for (source, target), part_dims, weight in zip(((ditf_src, ditf_trg), (dino_src, dino_trg)), settings.dims,
                                                    settings.weights):
        source, target = source.to(torch.float64), target.to(torch.float64)
        if settings.normalize in ("before", "both"):
            source, target = F.normalize(source, dim=0), F.normalize(target, dim=0)
        if part_dims is not None:
            source, target = co_pca(source, target, part_dims, settings.pca, settings.seed)
        for index, part in enumerate((source, target)):
            part = _resized(part, grids[index])
            if settings.normalize in ("after", "both"):
                part = F.normalize(part, dim=0)
            fused[index].append(part * weight)
    return torch.cat(fused[0]).float(), torch.cat(fused[1]).float()


def fuse_pair(settings: FusionSettings, ditf_src: torch.Tensor, ditf_trg: torch.Tensor, dino_src: torch.Tensor,
              dino_trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fuse` with the parameters of `settings`."""
    return fuse(ditf_src, ditf_trg, dino_src, dino_trg, **asdict(settings))
