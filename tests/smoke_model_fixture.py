"""The random-weight FLUX smoke model, built once per test session into pytest's temporary folder.

Test modules import the fixture (`from smoke_model_fixture import smoke_model_dir`); the build is
skipped when the folder already holds the model, so importing it into several modules builds it once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ditf.smoke_cache import cached_smoke_model

SMOKE_ARGS = ["--block", "28", "--t", "261", "--ensemble", "1", "--resolution", "128", "--dtype", "fp32",
              "--device", "cpu"]
"""Tiny DiTF settings for the smoke model: one noise draw at 128 pixels, a fraction of a second per image."""


@pytest.fixture(scope="session")
def smoke_model_dir(tmp_path_factory) -> Path:
    """Folder of the smoke model (a diffusers FLUX pipeline with random weights)."""
    return cached_smoke_model(tmp_path_factory.getbasetemp() / "ditf-cache")
