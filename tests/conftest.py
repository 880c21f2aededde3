"""Shared test set-up: offline hub, few threads, and the tiny FLUX pipeline folder built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the test models are tiny: one thread beats two, and CI has two cores


@pytest.fixture(scope="session")
def flux_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny FluxPipeline around the flux_tiny fixture transformer (reference weights)."""
    from tiny_models import flux_pipeline

    return flux_pipeline(tmp_path_factory.mktemp("flux") / "pipeline")
