"""Shared test set-up: offline hub, few threads, and each family's tiny pipeline built and loaded once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from ditf import DiTFeaturizer

torch.set_num_threads(1)  # the test models are tiny: one thread beats two, and CI has two cores


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Callable[[str], Path]:
    """`tiny_pipeline_dir(name)`: the folder of the tiny pipeline `tiny_families.FAMILIES[name]`, saved on first use."""
    from tiny_families import FAMILIES

    folders: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in folders:
            folders[name] = FAMILIES[name].build(tmp_path_factory.mktemp(name) / "pipeline")
        return folders[name]

    return folder


@pytest.fixture(scope="session")
def tiny_featurizer(tiny_pipeline_dir) -> Callable[[str], DiTFeaturizer]:
    """`tiny_featurizer(name)`: that family's pipeline folder loaded with `DiTFeaturizer.from_pretrained`, once.

    Shared by every test of the session: tests that hook it remove their hooks.
    """
    from ditf import DiTFeaturizer

    loaded: dict[str, DiTFeaturizer] = {}

    def featurizer(name: str) -> DiTFeaturizer:
        if name not in loaded:
            loaded[name] = DiTFeaturizer.from_pretrained(str(tiny_pipeline_dir(name)), device="cpu")
        return loaded[name]

    return featurizer


@pytest.fixture(scope="session")
def flux_pipeline_dir(tiny_pipeline_dir) -> Path:
    """A saved tiny FluxPipeline around the flux_tiny fixture transformer (reference weights)."""
    return tiny_pipeline_dir("flux")


@pytest.fixture(scope="module")
def pipe(flux_pipeline_dir):
    """The tiny FluxPipeline (flux_tiny fixture transformer), progress bars off."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(flux_pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
