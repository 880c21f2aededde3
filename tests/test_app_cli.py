"""`ditf app` on the command line: what it serves, where, with which first settings (no server is started:
`launch` is replaced by a recorder)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from smoke_model_fixture import smoke_model_folder

import ditf.app.ui
from ditf.cli import main


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory) -> Path:
    return smoke_model_folder(tmp_path_factory)


@pytest.fixture
def served(monkeypatch):
    """What `ditf app` would serve: the arguments of `build_app` and `launch`."""
    record = {}
    build = ditf.app.ui.build_app

    def build_app(store, settings, examples=None):
        record.update(store=store, settings=settings, examples=examples)
        return build(store, settings, examples)

    def launch(app, host, port, share, allowed_paths=(), block=True):
        record.update(host=host, port=port, share=share, allowed_paths=list(allowed_paths))

    monkeypatch.setattr(ditf.app.ui, "build_app", build_app)
    monkeypatch.setattr(ditf.app.ui, "launch", launch)
    return record


def test_without_a_model_it_serves_the_smoke_model_on_localhost_with_the_examples(served, smoke_model_dir, capsys):
    assert main(["app", "--cache", str(smoke_model_dir.parent), "--device", "cpu"]) == 0
    assert "random-weight smoke model" in capsys.readouterr().out
    settings = served["settings"]
    assert settings.model == str(smoke_model_dir)
    assert (settings.block, settings.t, settings.ensemble, settings.resolution, settings.variant) == (28, 261, 2, 256, "ditf")
    assert (served["host"], served["port"], served["share"]) == ("127.0.0.1", 7860, False)
    assert served["examples"] is not None and served["allowed_paths"] == [served["examples"][0].parent]


def test_flags_give_the_first_control_values_and_the_options_that_hold_for_the_session(served, smoke_model_dir):
    argv = ["app", "--model", str(smoke_model_dir), "--device", "cpu", "--block", "20", "--t", "500", "--variant", "raw",
            "--prompt", "a cat", "--seed", "3", "--max-pixels", "1000000", "--host", "0.0.0.0", "--port", "8001",
            "--share"]
    assert main(argv) == 0
    settings, store = served["settings"], served["store"]
    assert (settings.block, settings.t, settings.variant, settings.prompt, settings.seed) == (20, 500, "raw", "a cat", 3)
    assert store.given == {"prompt": "a cat", "seed": 3} and store.max_pixels == 1_000_000
    assert (served["host"], served["port"], served["share"]) == ("0.0.0.0", 8001, True)
    page_settings = store.settings(str(smoke_model_dir), "ditf", block=28, t=261, ensemble=1, resolution=128)
    assert (page_settings.prompt, page_settings.seed, page_settings.discard) == ("a cat", 3, "auto")


def test_a_port_that_cannot_be_served_names_the_flag(monkeypatch, smoke_model_dir, capsys):
    def busy(*args, **kwargs):
        raise OSError("Cannot find empty port in range: 7860-7860.")

    monkeypatch.setattr(ditf.app.ui, "launch", busy)
    assert main(["app", "--model", str(smoke_model_dir), "--device", "cpu"]) == 2
    assert "--port 7860 on --host 127.0.0.1 cannot be served (Cannot find empty port" in capsys.readouterr().err


def test_without_gradio_it_says_how_to_install_it(monkeypatch, smoke_model_dir, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert main(["app", "--model", str(smoke_model_dir), "--device", "cpu"]) == 2
    assert "needs gradio, which is not installed; install it with pip install 'ditf[app]'" in capsys.readouterr().err
