"""`ditf features` and `ditf match` end to end on a tiny FLUX pipeline folder."""

import json
from pathlib import Path


from ditf.cli import main
from ditf.features.io import load_features

EXAMPLES = Path(__file__).parent.parent / "examples"
FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--block", "21", "--t", "261", "--ensemble", "1", "--resolution", "128", "--dtype", "fp32", "--device", "cpu"]


def test_features_writes_one_file_per_image_with_settings(flux_pipeline_dir, tmp_path, capsys):
    images = [str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg")]
    assert main(["features", *images, "--model", str(flux_pipeline_dir), "-o", str(tmp_path), *SMALL]) == 0
    feats, header = load_features(tmp_path / "cat1.safetensors")
    assert feats.shape == (64, 96 // 16, 128 // 16)
    recorded = header.settings
    assert recorded["settings"]["block"] == 21 and recorded["settings"]["t"] == 261 and recorded["settings"]["discard"] == "auto"
    assert recorded["image"].endswith("cat1.jpg") and recorded["discarded"] == [11, 42]
    before = (tmp_path / "cat2.safetensors").stat().st_mtime_ns
    assert main(["features", *images, "--model", str(flux_pipeline_dir), "-o", str(tmp_path), *SMALL]) == 0
    assert (tmp_path / "cat2.safetensors").stat().st_mtime_ns == before  # same settings: kept, not recomputed
    assert "wrote 0, skipped 2" in capsys.readouterr().out


def test_features_of_a_dataset_tree_are_what_eval_reads(flux_pipeline_dir, tmp_path, capsys):
    """`ditf features JPEGImages/*/*.jpg -o DIR` writes DIR/<category>/<stem>.safetensors: `--features DIR` as it is."""
    root = FIXTURES / "spair_real"
    images = sorted(str(p) for p in (root / "JPEGImages").glob("*/*.jpg"))
    assert main(["features", *images, "--model", str(flux_pipeline_dir), "-o", str(tmp_path / "feats"), *SMALL,
                 "--prompt", "a photo of a aeroplane"]) == 0
    assert main(["eval", "spair", "--root", str(root), "--features", str(tmp_path / "feats"), "--quiet",
                 "-o", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"]["pairs"] == 12


def test_match_prints_points_and_draws_the_figure(flux_pipeline_dir, tmp_path, capsys):
    figure = tmp_path / "match.png"
    code = main(["match", str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg"), "--points", "186,185;274,185",
                 "--model", str(flux_pipeline_dir), "-o", str(figure), *SMALL])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["source"] == [[186, 185], [274, 185]]
    assert all(0 <= x < 480 and 0 <= y < 360 for x, y in result["target"])
    assert figure.stat().st_size > 10_000


def test_bad_inputs_exit_with_a_message(flux_pipeline_dir, tmp_path, capsys):
    assert main(["features", str(tmp_path / "missing.jpg"), "--model", str(flux_pipeline_dir), "-o", str(tmp_path)]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert main(["features", str(EXAMPLES / "cat1.jpg"), "--model", "flux-devv", "-o", str(tmp_path)]) == 2
    assert "flux-dev" in capsys.readouterr().err  # the known aliases are listed
    code = main(["match", str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg"), "--points", "9999,5",
                 "--model", str(flux_pipeline_dir), "-o", str(tmp_path / "m.png"), *SMALL])
    assert code == 2 and "--points [[9999, 5]] lie outside" in capsys.readouterr().err


def test_a_feature_file_is_reused_only_for_the_same_image_content_and_settings(flux_pipeline_dir, tmp_path, capsys,
                                                                             monkeypatch):
    import shutil

    picture = tmp_path / "pic.jpg"
    shutil.copy(EXAMPLES / "cat1.jpg", picture)
    run = ["features", str(picture), "--model", str(flux_pipeline_dir), "-o", str(tmp_path / "out"), *SMALL]
    assert main(run) == 0 and "wrote 1, skipped 0" in capsys.readouterr().out
    assert main(run) == 0 and "wrote 0, skipped 1" in capsys.readouterr().out
    shutil.copy(EXAMPLES / "cat2.jpg", picture)  # same name, another picture
    assert main(run) == 0 and "wrote 1, skipped 0" in capsys.readouterr().out
    assert main(run + ["--half"]) == 0 and "wrote 1, skipped 0" in capsys.readouterr().out
    assert load_features(tmp_path / "out" / "pic.safetensors")[0].dtype.itemsize == 2

    def with_model(model: str) -> list[str]:
        return [*run[:3], model, *run[4:], "--half"]

    folder = shutil.copytree(flux_pipeline_dir, tmp_path / "smoke")
    assert main(with_model(str(folder))) == 0 and "wrote 1, skipped 0" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    for spelling in ("smoke", "./smoke", "smoke/"):  # the same folder
        assert main(with_model(spelling)) == 0 and "wrote 0, skipped 1" in capsys.readouterr().out


def test_the_libraries_loading_bars_and_notices_are_hidden_unless_verbose(flux_pipeline_dir, tmp_path, capsys):
    argv = ["features", str(EXAMPLES / "cat1.jpg"), "--model", str(flux_pipeline_dir), "-o", str(tmp_path), *SMALL]
    assert main(argv) == 0
    quiet = capsys.readouterr().err
    assert "Loading pipeline components" not in quiet and "Loading weights" not in quiet
    assert main(["--verbose", *argv, "--overwrite"]) == 0
    assert "Loading pipeline components" in capsys.readouterr().err


def test_the_smoke_model_says_its_matches_are_meaningless(flux_pipeline_dir, tmp_path, capsys):
    code = main(["match", str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg"), "--points", "186,185",
                 "--model", str(flux_pipeline_dir), "-o", str(tmp_path) + "/", *SMALL])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["random_weights"].startswith("random-weight smoke model")
    assert (tmp_path / "match.png").is_file()


def test_smoke_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    import ditf.smoke

    def dies_half_way(folder, transformer):
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(ditf.smoke, "_save_flux_smoke_pipeline", dies_half_way)
    assert main(["smoke-model", "-o", str(tmp_path / "smoke")]) == 130
    assert list(tmp_path.iterdir()) == []  # neither the model folder nor its staging folder
