"""The random-weight FLUX smoke model `ditf app` serves by default, built once per test session.

Each test module that needs it declares a fixture calling `smoke_model_folder(tmp_path_factory)`; the model is
built into pytest's base temporary folder (the app's own `cached_smoke_model`), so modules share one build.
It is `ditf.smoke.flux_smoke_transformer`'s model, with massive channels planted at 11 and 42.
"""

from __future__ import annotations

from pathlib import Path

from ditf.app.smoke_model import cached_smoke_model

SMOKE_CONTROLS = {"block": 28, "t": 261, "ensemble": 1, "resolution": 128}
"""Tiny DiTF settings for the smoke model: one noise draw at 128 pixels, a fraction of a second per image."""
SMOKE_ARGS = ["--block", "28", "--t", "261", "--ensemble", "1", "--resolution", "128", "--dtype", "fp32",
              "--device", "cpu"]
"""`SMOKE_CONTROLS` as command-line flags, on the CPU in fp32 (what the app's store uses there)."""
PLANTED_CHANNELS = [11, 42]
"""The channels `ditf.smoke.flux_smoke_transformer` adds large constants to."""


def smoke_model_folder(tmp_path_factory) -> Path:
    """Folder of the smoke model (a diffusers FLUX pipeline with random weights), built on first use."""
    return cached_smoke_model(tmp_path_factory.getbasetemp() / "ditf-cache")
