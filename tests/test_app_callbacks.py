"""The app's callbacks as plain functions, on the random-weight smoke model (no gradio, no browser)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from smoke_model_fixture import smoke_model_folder

from ditf.app import FeatureSettings, FeatureStore, callbacks, pretrained_loader
from ditf.app import images as app_images
from ditf.errors import InvalidArgumentError
from ditf.matching.pair import match_pair

EXAMPLES = Path(__file__).parent.parent / "examples"
SOURCE, TARGET = str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg")
TINY = {"block": 28, "t": 261, "ensemble": 1, "resolution": 128}


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory) -> Path:
    return smoke_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def store() -> FeatureStore:
    return FeatureStore(pretrained_loader("cpu"))


def click(store, model, point, source=SOURCE, targets=((TARGET, None),), **settings):
    values = {**TINY, **settings}
    return callbacks.click(store, source, list(targets), point, str(model), values["block"], values["t"],
                           values["ensemble"], values["resolution"], values.get("variant", "ditf"))


def test_click_predicts_what_match_pair_predicts_and_draws_every_target(store, smoke_model_dir):
    view = click(store, smoke_model_dir, [186, 185], targets=[(TARGET, None), (SOURCE, None)])
    assert not view.error, view.status
    settings = FeatureSettings(**TINY)
    src, trg = store.image(SOURCE), store.image(TARGET)
    src_feats = store.features(src, str(smoke_model_dir), settings)
    expected = match_pair(src_feats, store.features(trg, str(smoke_model_dir), settings), torch.tensor([[186, 185]]),
                          src.size, trg.size)
    assert view.targets[0] == tuple(expected.target[0].tolist())
    assert view.targets[1] == (186, 185)  # the source against itself: the clicked pixel
    x, y = view.targets[0]
    assert view.matches.splitlines()[1].startswith(f"target 1: ({x}, {y}) cosine ")
    assert [p.shape for p, _ in view.pictures] == [(375, 500, 3), (360, 480, 3), (375, 500, 3)]
    assert [c for _, c in view.pictures][1] == f"target 1: ({x}, {y})"


def test_a_second_click_runs_no_model_and_prepares_no_target(store, smoke_model_dir):
    click(store, smoke_model_dir, [10, 10])
    before = (store.counters.extractions, store.counters.preparations, store.counters.model_loads)
    view = click(store, smoke_model_dir, [300, 40])
    assert not view.error and "cached features" in view.status
    assert (store.counters.extractions, store.counters.preparations, store.counters.model_loads) == before


def test_each_variant_has_its_own_cache_entry(store, smoke_model_dir):
    before = store.counters.extractions
    assert not click(store, smoke_model_dir, [50, 50], variant="ln").error
    assert not click(store, smoke_model_dir, [50, 50], variant="ln").error
    assert store.counters.extractions == before + 2  # source and target once each


def test_bad_inputs_give_a_message_and_the_store_keeps_working(store, smoke_model_dir, tmp_path, monkeypatch):
    outside = click(store, smoke_model_dir, [500, 10])
    assert outside.error and "outside the source image (500x375 pixels)" in outside.status
    assert click(store, smoke_model_dir, None).error

    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    not_image = click(store, smoke_model_dir, [5, 5], targets=[(str(text), None)])
    assert not_image.error and "'notes.jpg' is not an image" in not_image.status

    monkeypatch.setattr(app_images, "MAX_PIXELS", 100 * 100)
    fresh = tmp_path / "fresh.jpg"  # a path the store has not decoded yet
    fresh.write_bytes((EXAMPLES / "cat2.jpg").read_bytes())
    huge = click(store, smoke_model_dir, [5, 5], source=str(fresh))
    assert huge.error and "over the app's limit" in huge.status and "downscale" in huge.status
    monkeypatch.undo()

    missing_model = click(store, tmp_path / "no-such-model", [5, 5])
    assert missing_model.error and "no-such-model" in missing_model.status
    assert click(store, "  ", [5, 5]).error
    assert "ensemble 0 is outside" in click(store, smoke_model_dir, [5, 5], ensemble=0).status
    assert "not a whole number" in click(store, smoke_model_dir, [5, 5], block=27.5).status
    assert not click(store, smoke_model_dir, [5, 5]).error  # still answering after all that


def test_a_loader_that_crashes_is_reported_as_a_model_error():
    def crash(model: str, block: int):
        raise RuntimeError("CUDA out of memory")

    view = click(FeatureStore(crash), "some/model", [5, 5])
    assert view.error and "model 'some/model' failed to load (RuntimeError: CUDA out of memory)" in view.status


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (4200, 4100)).save(path)  # over 4096 x 4096 pixels, a small file
    with pytest.raises(app_images.ImageError, match="17.2 megapixels"):
        app_images.load_upload(path)


def test_pca_tab_colours_source_and_targets(store, smoke_model_dir):
    view = callbacks.pca(store, SOURCE, [(TARGET, None)], str(smoke_model_dir), **TINY, variant="ditf",
                         foreground=True)
    assert not view.error, view.status
    assert [p.shape for p, _ in view.pictures] == [(375, 500, 3), (360, 480, 3)]
    assert all(p.dtype == np.uint8 for p, _ in view.pictures)


def test_massive_tab_finds_the_smoke_models_planted_channels(store, smoke_model_dir):
    view = callbacks.massive(store, SOURCE, str(smoke_model_dir), **TINY)
    assert not view.error, view.status
    assert view.profile.channels == [11, 42]  # ditf.smoke plants constants on these two channels
    assert "11" in view.summary and view.figure.axes[0].get_xlabel() == "channel"
    assert view.profile.mean_abs.shape == (64,)


def test_settings_reject_unknown_variants():
    with pytest.raises(InvalidArgumentError, match="variant 'dino'"):
        FeatureSettings.from_controls(28, 261, 1, 128, "dino")


def test_the_cli_modules_import_neither_gradio_nor_anything_heavier_than_ditf_itself():
    import subprocess
    import sys

    code = ("import sys, ditf; before = set(sys.modules); import ditf.cli.app, ditf.cli.pca, ditf.app.ui; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    added = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("gradio", "diffusers", "transformers", "playwright", "matplotlib"):
        assert f"'{heavy}'" not in added
