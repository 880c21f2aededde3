"""`FusionSettings`: the parameters of the DiTF + DINOv2 fusion (`ditf.features.fusion`), with their sources.

This module imports no torch, so the command line can offer and check the fusion options before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ditf.errors import InvalidArgumentError

FUSABLE_BASELINES = ("dinov2-b14", "dinov2-l14")
"""The `ditf.baselines` a DiTF map is fused with by name: DINOv2 ViT-B/14 (the paper's "11th layer" token facet,
SD-DINO's model) and ViT-L/14."""
NORMALIZE_MODES = ("after", "before", "both")
"""L2 normalisation of each part per location: after PCA and resizing (SD-DINO), before PCA, or both."""
GRIDS = ("finer", "ditf", "dino")
"""The common grid of an image: the map with more cells (SD-DINO), the DiTF map's, or the DINOv2 map's."""
PCA_METHODS = ("exact", "lowrank")
"""exact: eigendecomposition in float64; lowrank: SD-DINO's `torch.pca_lowrank` (randomised, seeded)."""
LOWRANK_ITERATIONS = 2
"""Subspace iterations of `torch.pca_lowrank` (its default, used by SD-DINO)."""
FUSION_REFERENCE = ("SD-DINO co_pca + fusion (github.com/Junyi42/sd-dino @b85df18, utils/utils_correspondence.py, "
                    "pck_spair_pascal.py); DiTF paper (arXiv 2505.18584) Eq. 14: PCA to 1280 dimensions")
UNPUBLISHED = ("the DiTF paper gives the output dimension (1280) only: the per-part dimensions, the weights, the "
               "normalisation, the grid and the PCA algorithm are SD-DINO's choices or ours")


@dataclass(frozen=True)
class FusionSettings:
    """How a DiTF map and a DINOv2 map of each image of a pair become one fused map.

    weights: (DiTF, DINOv2) factors applied to each part after normalisation (SD-DINO: 1, 1).
    dims: (DiTF, DINOv2) principal components kept per part, None to keep the part whole (SD-DINO keeps
    DINOv2 whole); the fused map has dims[0] + dims[1] channels. normalize: see `NORMALIZE_MODES`. grid: see
    `GRIDS`. pca: see `PCA_METHODS`; seed: the random seed of pca="lowrank".
    """

    weights: tuple[float, float] = (1.0, 1.0)
    dims: tuple[int | None, int | None] = (512, None)
    normalize: str = "after"
    grid: str = "finer"
    pca: str = "exact"
    seed: int = 0

    def __post_init__(self) -> None:
        weights = tuple(self.weights)
        if len(weights) != 2 or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) \
                or not any(weights):
            raise InvalidArgumentError(f"fusion weights={self.weights!r} must be two finite numbers >= 0 (DiTF, "
                                       "DINOv2), not both 0; SD-DINO uses 1 1.")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        dims = tuple(self.dims)
        if len(dims) != 2 or not all(d is None or (_is_whole(d) and d >= 1) for d in dims):
            raise InvalidArgumentError(f"fusion dims={self.dims!r} must be two whole numbers >= 1 or None (no PCA) "
                                       "for (DiTF, DINOv2), e.g. (512, None).")
        object.__setattr__(self, "dims", tuple(None if d is None else int(d) for d in dims))
        for name, value, valid in (("normalize", self.normalize, NORMALIZE_MODES), ("grid", self.grid, GRIDS),
                                   ("pca", self.pca, PCA_METHODS)):
            if value not in valid:
                raise InvalidArgumentError(f"fusion {name}={value!r} is not one of {', '.join(valid)}.")
        if not _is_whole(self.seed) or self.seed < 0:
            raise InvalidArgumentError(f"fusion seed={self.seed!r} must be a whole number >= 0.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values."""
        values = asdict(self)
        values["weights"], values["dims"] = list(self.weights), list(self.dims)
        return values

    def card(self) -> dict[str, Any]:
        """A plain-language statement of the fusion, with its sources and what the paper leaves unpublished."""
        def part(name: str, dims: int | None) -> str:
            return f"{name} reduced to {dims} principal components" if dims else f"{name} kept whole (no PCA)"

        normalized = {"after": "after PCA and resizing", "before": "before PCA",
                      "both": "before PCA and again after resizing"}[self.normalize]
        grid = {"finer": "the grid of the map with more cells (the other resized bilinearly)",
                "ditf": "the DiTF map's grid", "dino": "the DINOv2 map's grid"}[self.grid]
        pca = ("exact (float64 eigendecomposition, sign fixed per axis)" if self.pca == "exact"
               else f"torch.pca_lowrank, {LOWRANK_ITERATIONS} iterations, seed {self.seed} (SD-DINO's randomised PCA)")
        return {
            "reference": FUSION_REFERENCE,
            "pca": f"fitted per pair on the source and target tokens together, centred by their mean; {pca}; "
                   f"{part('DiTF', self.dims[0])}, {part('DINOv2', self.dims[1])}",
            "grid": f"each image's two maps brought to {grid}",
            "normalization": f"each part L2-normalised per location {normalized}",
            "weights": f"DiTF x {self.weights[0]:g}, DINOv2 x {self.weights[1]:g}, concatenated [DiTF, DINOv2]",
            "unpublished": UNPUBLISHED,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fusion_dims(settings: FusionSettings, ditf_channels: int, dino_channels: int, ditf_where: str = "",
                      dino_where: str = "") -> None:
    """InvalidArgumentError before any fusion when a part has fewer channels than its requested PCA dims; `*_where`
    name a map of each part (a file) in the message."""
    for part, dims, channels, where in (("DiTF", settings.dims[0], ditf_channels, ditf_where),
                                        ("DINOv2", settings.dims[1], dino_channels, dino_where)):
        if dims is not None and dims > channels:
            shown = " ".join("none" if d is None else str(min(d, channels) if name == part else d)
                             for name, d in (("DiTF", settings.dims[0]), ("DINOv2", settings.dims[1])))
            raise InvalidArgumentError(
                f"fusion dims {list(settings.dims)}: the {part} maps have {channels} channels{f' ({where})' if where else ''}, "
                f"fewer than the {dims} principal components asked for; ask for at most {channels} (e.g. --fuse-dims "
                f"{shown}, dims=({shown.replace(' ', ', ').replace('none', 'None')}) in Python), or none to keep the "
                "part whole.")
