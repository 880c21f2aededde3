"""Where the random-weight smoke model lives on disk, and how to tell that a model folder is one.

`ditf app` without `--model` builds the smoke model (`ditf.smoke.build_flux_smoke_pipeline`) once into a
cache folder and reuses it; figures and pages label its results as meaningless.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

SMOKE_MARKER = "SMOKE_MODEL.txt"
"""File that `build_flux_smoke_pipeline` writes into every smoke model folder."""


def default_cache_dir() -> Path:
    """`$DITF_CACHE`, else `$XDG_CACHE_HOME/ditf`, else `~/.cache/ditf`."""
    if os.environ.get("DITF_CACHE"):
        return Path(os.environ["DITF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditf"


def is_smoke_model(model: str | os.PathLike[str]) -> bool:
    """True when `model` is a local folder holding a random-weight smoke model."""
    return (Path(model) / SMOKE_MARKER).is_file()


def cached_smoke_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the FLUX smoke model in `cache_dir` (default: `default_cache_dir()`), built offline on
    first use (a few seconds). Concurrent callers are safe: each builds into its own temporary folder and
    the first to finish is renamed into place."""
    from ditf.smoke import build_flux_smoke_pipeline

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "smoke-flux"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".smoke-flux.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        build_flux_smoke_pipeline(staging / "pipeline")
        try:
            os.rename(staging / "pipeline", folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
