"""The random-weight smoke model `ditf app` serves when no model is given: built once into the cache folder.

The folder is `smoke-flux` beside the feature cache (`$DITF_CACHE_DIR`, default `~/.cache/ditf`); the model is
`ditf.smoke.build_flux_smoke_pipeline`'s, whose folders carry `ditf.smoke.SMOKE_MARKER`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ditf.errors import InvalidArgumentError

SMOKE_CONTROLS = {"block": 28, "t": 261, "ensemble": 2, "resolution": 256}
"""The page's settings for a model without a preset, when it is a smoke model: `./run.sh demo`'s."""


def smoke_model_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the smoke model lives: `cache_dir`/smoke-flux (default: beside `default_cache_dir()`)."""
    from ditf.eval.extractors import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent
    return root / "smoke-flux"


def cached_smoke_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The smoke model's folder (see `smoke_model_folder`), built offline on first use (seconds). The build is
    atomic, so concurrent first uses are safe: one wins the rename and the others use its folder."""
    from ditf.smoke import build_flux_smoke_pipeline, is_smoke_model

    folder = smoke_model_folder(cache_dir)
    if not is_smoke_model(folder):
        try:
            build_flux_smoke_pipeline(folder)
        except (InvalidArgumentError, OSError):
            if not is_smoke_model(folder):  # another process finished first: fine; anything else: report it
                raise
    return folder
