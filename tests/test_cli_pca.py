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
    assert f"wrote {figure}" in capsys.readouterr().out
    with Image.open(figure) as written:
        assert written.format == "PNG" and written.width > 600  # two columns of about 3 inches


def test_pca_foreground_mode_with_a_threshold_into_a_folder(smoke_model_dir, tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    code = main(["pca", *IMAGES, "--foreground", "--threshold", "0.4", "--model", str(smoke_model_dir),
                 "-o", str(folder), *SMOKE_ARGS])
    assert code == 0 and (folder / "pca.png").stat().st_size > 10_000


def test_the_figure_is_the_pictures_of_pca_rgb_on_the_featurizers_maps(smoke_model_dir, tmp_path, monkeypatch):
    """The command draws `pca_rgb` of exactly the maps `DiTFeaturizer` gives for these settings."""
    import torch

    import ditf.viz
    from ditf import DiTFeaturizer
    from ditf.features.preprocess import load_image

    drawn = {}

    def keep(images, pictures, path, **kwargs):
        drawn["pictures"] = pictures
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(ditf.viz, "save_pca_figure", keep)
    assert main(["pca", *IMAGES, "--model", str(smoke_model_dir), "-o", str(tmp_path / "p.png"), *SMOKE_ARGS]) == 0
    fx = DiTFeaturizer.from_pretrained(str(smoke_model_dir), torch_dtype=torch.float32, device="cpu")
    images = [load_image(path) for path in IMAGES]
    maps = fx(images, block=28, t=261, ensemble=1, resolution=128, progress=False)
    expected = ditf.viz.pca_rgb(maps, [(image.height, image.width) for image in images])
    assert len(drawn["pictures"]) == 2
    for got, want in zip(drawn["pictures"], expected):
        assert got.shape == want.shape and (got == want).all()
