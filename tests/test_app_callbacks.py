"""The app's callbacks as plain functions, on the random-weight smoke model (no gradio, no browser)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from smoke_model_fixture import PLANTED_CHANNELS, SMOKE_CONTROLS, smoke_model_folder

from ditf.app import FeatureStore, ModelLoader, callbacks
from ditf.app.examples import bundled_examples
from ditf.matching.pair import match_pair
from ditf.settings import VARIANTS

EXAMPLES = Path(__file__).parent.parent / "examples"
SOURCE, TARGET = str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg")


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory) -> Path:
    return smoke_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def store() -> FeatureStore:
    return FeatureStore(ModelLoader("cpu"))


def click(store, model, point, source=SOURCE, targets=((TARGET, None),), variant="ditf", **controls):
    values = {**SMOKE_CONTROLS, **controls}
    return callbacks.click(store, source, list(targets), point, str(model), values["block"], values["t"],
                           values["ensemble"], values["resolution"], variant)


def test_click_predicts_what_match_pair_predicts_and_draws_every_target(store, smoke_model_dir):
    view = click(store, smoke_model_dir, [186, 185], targets=[(TARGET, None), (SOURCE, None)])
    assert not view.error, view.status
    settings = store.settings(str(smoke_model_dir), **SMOKE_CONTROLS)
    src, trg = store.image(SOURCE), store.image(TARGET)
    expected = match_pair(store.features(src, settings).features, store.features(trg, settings).features,
                          torch.tensor([[186, 185]]), src.size, trg.size)
    assert view.targets[0] == tuple(expected.target[0].tolist())
    assert view.targets[1] == (186, 185)  # the source against itself: the clicked pixel
    x, y = view.targets[0]
    assert view.matches.splitlines()[1].startswith(f"target 1: ({x}, {y}) cosine ")
    assert [p.shape for p, _ in view.pictures] == [(375, 500, 3), (360, 480, 3), (375, 500, 3)]
    assert [c for _, c in view.pictures][1] == f"target 1: ({x}, {y})"
    assert "discarded channels [11, 42]" in view.status  # the ditf variant found the planted channels


def test_the_store_keeps_what_the_featurizer_computes_for_the_resolved_settings(store, smoke_model_dir):
    settings = store.settings(str(smoke_model_dir), "adaln", block=28.0, t=261.0, ensemble=1.0, resolution=128.0)
    assert (settings.block, settings.ensemble, settings.resolution) == (28, 1, 128)  # the page sends floats
    assert (settings.normalize, settings.modulate, settings.discard) == (True, True, None)
    kept = store.features(store.image(SOURCE), settings)
    fresh = store.featurizer(str(smoke_model_dir), 28).extract(SOURCE, settings=settings)
    assert torch.equal(kept.features, fresh.features)


def test_a_second_click_runs_no_model_and_prepares_no_target(store, smoke_model_dir):
    click(store, smoke_model_dir, [10, 10])
    before = (store.counters.extractions, store.counters.preparations, store.counters.model_loads)
    view = click(store, smoke_model_dir, [300, 40])
    assert not view.error and "cached features" in view.status
    assert (store.counters.extractions, store.counters.preparations, store.counters.model_loads) == before


def test_the_store_is_keyed_by_model_identity_not_by_how_the_path_is_spelled(store, smoke_model_dir):
    click(store, smoke_model_dir, [10, 10])
    before = store.counters.extractions
    spelled_differently = str(smoke_model_dir) + "/"
    view = click(store, spelled_differently, [20, 20])
    assert not view.error, view.status
    assert store.counters.extractions == before  # same weights, same image content, same settings


def test_the_same_pixels_under_another_name_hit_the_store(store, smoke_model_dir, tmp_path):
    click(store, smoke_model_dir, [10, 10])
    before = store.counters.extractions
    renamed = tmp_path / "renamed.jpg"
    shutil.copy(SOURCE, renamed)
    assert not click(store, smoke_model_dir, [10, 10], source=str(renamed)).error
    assert store.counters.extractions == before


def test_each_variant_and_setting_has_its_own_entry(store, smoke_model_dir):
    before = store.counters.extractions
    assert not click(store, smoke_model_dir, [50, 50], variant="ln").error
    assert not click(store, smoke_model_dir, [50, 50], variant="ln").error
    assert store.counters.extractions == before + 2  # source and target once each
    assert not click(store, smoke_model_dir, [50, 50], variant="ln", t=500).error
    assert store.counters.extractions == before + 4


def test_every_variant_is_the_featurizers_variant(store, smoke_model_dir):
    for variant, switches in VARIANTS.items():
        settings = store.settings(str(smoke_model_dir), variant, **SMOKE_CONTROLS)
        assert {name: getattr(settings, name) for name in switches} == dict(switches)


def test_bad_inputs_give_a_message_and_the_store_keeps_working(store, smoke_model_dir, tmp_path):
    outside = click(store, smoke_model_dir, [500, 10])
    assert outside.error and "outside the source image (500x375 pixels)" in outside.status
    assert "not on the source image" in click(store, smoke_model_dir, None).status

    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    not_image = click(store, smoke_model_dir, [5, 5], targets=[(str(text), None)])
    assert not_image.error and "upload 'notes.jpg'" in not_image.status and "not an image" in not_image.status

    missing_model = click(store, tmp_path / "no-such-model", [5, 5])
    assert missing_model.error and "no-such-model': no such file or folder" in missing_model.status
    assert "the model box is empty" in click(store, "  ", [5, 5]).status
    assert "ensemble=0 must be at least 1" in click(store, smoke_model_dir, [5, 5], ensemble=0).status
    assert "block=27.5 must be a whole number" in click(store, smoke_model_dir, [5, 5], block=27.5).status
    assert "t=1261 is outside 0..1000" in click(store, smoke_model_dir, [5, 5], t=1261).status
    assert "more than the app's 64" in click(store, smoke_model_dir, [5, 5], ensemble=65).status
    assert "variant 'dino' is not one of raw, ln, adaln, ditf" in click(store, smoke_model_dir, [5, 5], variant="dino").status
    assert "no target image" in click(store, smoke_model_dir, [5, 5], targets=[]).status
    assert not click(store, smoke_model_dir, [5, 5]).error  # still answering after all that


def test_a_huge_upload_is_refused_from_its_header(smoke_model_dir, tmp_path):
    small_limit = FeatureStore(ModelLoader("cpu"), max_pixels=100 * 100)
    huge = tmp_path / "huge.png"
    Image.new("L", (200, 150)).save(huge)
    view = click(small_limit, smoke_model_dir, [5, 5], source=str(huge))
    assert view.error and "upload 'huge.png'" in view.status and "larger than the limit" in view.status
    assert small_limit.counters.model_loads == 0


def test_a_loader_that_crashes_is_reported_as_a_model_error(smoke_model_dir):
    class Crashing(ModelLoader):
        def load(self, model: str, block: int):
            raise RuntimeError("CUDA out of memory")

    view = click(FeatureStore(Crashing("cpu")), smoke_model_dir, [5, 5])
    assert view.error and "failed to load (RuntimeError: CUDA out of memory)" in view.status


def test_pca_tab_colours_source_and_targets(store, smoke_model_dir):
    view = callbacks.pca(store, SOURCE, [(TARGET, None)], str(smoke_model_dir), **SMOKE_CONTROLS, variant="ditf",
                         foreground=True)
    assert not view.error, view.status
    assert [p.shape for p, _ in view.pictures] == [(375, 500, 3), (360, 480, 3)]
    assert all(p.dtype == np.uint8 for p, _ in view.pictures)
    assert (view.pictures[0][0] == 0).all(axis=2).any()  # foreground mode paints the background black


def test_massive_tab_finds_the_smoke_models_planted_channels(store, smoke_model_dir):
    view = callbacks.massive(store, SOURCE, str(smoke_model_dir), **SMOKE_CONTROLS)
    assert not view.error, view.status
    assert view.profile.channels == PLANTED_CHANNELS
    assert "11" in view.summary and view.figure.axes[0].get_xlabel() == "channel"
    assert view.profile.median_abs.shape == (64,)


def test_the_massive_tab_reads_the_raw_variants_entry_of_the_store(store, smoke_model_dir):
    callbacks.massive(store, SOURCE, str(smoke_model_dir), **SMOKE_CONTROLS)
    before = store.counters.extractions
    assert not click(store, smoke_model_dir, [5, 5], targets=[(SOURCE, None)], variant="raw").error
    assert store.counters.extractions == before


def test_the_examples_are_package_data():
    from importlib import resources

    assert (resources.files("ditf") / "assets" / "cat1.jpg").is_file()  # installed with the package (assets/*)
    source, target = bundled_examples()
    assert source.read_bytes() == Path(SOURCE).read_bytes() and target.read_bytes() == Path(TARGET).read_bytes()


def test_the_page_modules_import_gradio_only_when_the_page_is_built():
    """`ditf app --help` and the library parts work without gradio (test_package_layout checks torch)."""
    import os
    import subprocess
    import sys

    code = ("import sys, ditf.app, ditf.app.ui, ditf.app.callbacks, ditf.cli.app\n"
            "from ditf.cli import main\n"
            "try:\n    main(['app', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('gradio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")})
    assert done.stdout.strip().splitlines()[-1] == "False"
