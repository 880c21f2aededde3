"""Pixel points: the one check that points lie inside an image, shared by matching, the CLI and dataset loaders.

Points are (P, 2) rows of (x, y) pixels; sizes are (H, W). A point is inside when 0 <= x < W and 0 <= y < H.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ditf.errors import DitfError, InvalidArgumentError


def check_points_inside(points: Any, size: tuple[int, int], what: str,
                        error: type[DitfError] = InvalidArgumentError) -> None:
    """Raise `error` naming `what` unless every (x, y) row of `points` ((P, 2) array or tensor) lies inside an
    image of `size` (H, W)."""
    array = np.asarray(points.cpu() if hasattr(points, "cpu") else points, dtype=np.float64).reshape(-1, 2)
    height, width = size
    outside = (array[:, 0] < 0) | (array[:, 0] >= width) | (array[:, 1] < 0) | (array[:, 1] >= height)
    if outside.any():
        shown = [[int(v) if float(v).is_integer() else float(v) for v in row] for row in array[outside].tolist()]
        raise error(
            f"{what} {shown} lie outside the {width}x{height} (W x H) image; valid points satisfy 0 <= x < W and "
            "0 <= y < H."
        )
