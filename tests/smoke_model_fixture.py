"""The random-weight FLUX smoke model, built once per test session into pytest's temporary folder.

Each test module that needs it declares a fixture calling `smoke_model_folder(tmp_path_factory)`; the
build is skipped when the folder already holds the model, so several modules share one build.
"""

from __future__ import annotations

from pathlib import Path

from ditf.smoke_cache import cached_smoke_model

SMOKE_ARGS = ["--block", "28", "--t", "261", "--ensemble", "1", "--resolution", "128", "--dtype", "fp32",
              "--device", "cpu"]
"""Tiny DiTF settings for the smoke model: one noise draw at 128 pixels, a fraction of a second per image."""


def smoke_model_folder(tmp_path_factory) -> Path:
    """Folder of the smoke model (a diffusers FLUX pipeline with random weights), built on first use."""
    return cached_smoke_model(tmp_path_factory.getbasetemp() / "ditf-cache")
