"""`ditf pca` end to end on the random-weight smoke model."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from smoke_model_fixture import SMOKE_ARGS, smoke_model_folder

from ditf.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"
IMAGES = [str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg")]


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory) -> Path:
    return smoke_model_folder(tmp_path_factory)


def test_pca_writes_one_figure_for_all_images(smoke_model_dir, tmp_path, capsys):
    figure = tmp_path / "pca.png"
    assert main(["pca", *IMAGES, "--model", str(smoke_model_dir), "-o", str(figure), *SMOKE_ARGS]) == 0
    assert str(figure) in capsys.readouterr().out
    with Image.open(figure) as written:
        assert written.format == "PNG" and written.width > 600  # two columns of about 3 inches


def test_pca_foreground_mode_runs_with_a_threshold(smoke_model_dir, tmp_path):
    figure = tmp_path / "fg.png"
    code = main(["pca", *IMAGES, "--foreground", "--threshold", "0.4", "--model", str(smoke_model_dir),
                 "-o", str(figure), *SMOKE_ARGS])
    assert code == 0 and figure.stat().st_size > 10_000


def test_pca_bad_inputs_exit_with_a_message(smoke_model_dir, tmp_path, capsys):
    assert main(["pca", str(tmp_path / "missing.jpg"), "--model", str(smoke_model_dir), "-o", str(tmp_path / "x.png"),
                 *SMOKE_ARGS]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    code = main(["pca", *IMAGES, "--threshold", "0.4", "--model", str(smoke_model_dir), "-o", str(tmp_path / "y.png"),
                 *SMOKE_ARGS])
    assert code == 2 and "add --foreground" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
