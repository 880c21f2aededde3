"""`ditf sweep` and user presets: every (block, t) scored from one extraction per timestep, resumable, and the
best setting kept as a preset with its provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ditf import resolve_settings
from ditf.cli import main
from ditf.errors import InvalidArgumentError, UnknownModelError
from ditf.eval import DiTFExtractor
from ditf.eval.api import evaluate_correspondence
from ditf.eval.spair import load_spair
from ditf.eval.sweep import parse_blocks, subset_pairs, sweep
from ditf.indices import parse_indices
from ditf.registry import get_preset, preset_files, read_preset_file

MINI = Path(__file__).parent / "fixtures" / "spair_mini"
SETTINGS = ["--ensemble", "1", "--resolution", "64", "--dtype", "fp32", "--device", "cpu"]


def run_sweep(model: Path, tmp_path: Path, *extra: str) -> int:
    return main(["sweep", "spair", "--root", str(MINI), "--split", "test", "--pairs", "4", "--model", str(model),
                 "--blocks", "19-28:3", "--t", "100,261", "--cache", str(tmp_path / "cache"), "-o",
                 str(tmp_path / "sweep"), "--quiet", *SETTINGS, *extra])


def test_a_sweep_scores_every_block_and_timestep_and_keeps_the_best_as_a_preset(flux_pipeline_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    presets = tmp_path / "my_presets.toml"
    assert run_sweep(flux_pipeline_dir, tmp_path, "--write-preset", str(presets)) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert results["blocks"] == [19, 22, 25, 28] and results["t"] == [100.0, 261.0]
    assert [len(row) for row in results["per_point"]] == [4, 4] and results["benchmark"]["pairs"] == 4
    best = results["best"]
    assert best["per_point"] == max(max(row) for row in results["per_point"])
    assert f"best: block {best['block']}, t {best['t']:g}" in printed
    with Image.open(tmp_path / "sweep" / "sweep_heatmap.png") as heatmap:
        assert heatmap.size[0] > 300
    assert (tmp_path / "sweep" / "sweep_lines.png").is_file()

    # each (image, block, t) is one cache entry: a later evaluation at the best setting extracts nothing
    pairs = subset_pairs(load_spair(MINI), 4, 0)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(pairs.images()) * 4 * 2
    at_best = DiTFExtractor(str(flux_pipeline_dir), task="spair", block=best["block"], t=best["t"], ensemble=1,
                            resolution=64, dtype="fp32", device="cpu")
    scores = evaluate_correspondence(pairs, extractor=at_best, cache_dir=tmp_path / "cache", cache_only=True,
                                     progress=False)
    assert scores["all_per_point"] == best["per_point"]

    # the preset round trip: written with its provenance, listed, and used by name
    (entry,) = read_preset_file(presets).values()
    assert (entry.block, entry.t, entry.verified) == (best["block"], best["t"], True)
    assert "benchmark spair" in entry.source and "pairs 4" in entry.source
    assert main(["presets", "--presets", str(presets)]) == 0
    listing = capsys.readouterr().out
    assert str(flux_pipeline_dir) in listing and "user: my_presets.toml" in listing
    monkeypatch.setenv("DITF_PRESETS", str(presets))
    settings = resolve_settings(get_preset(str(flux_pipeline_dir)))
    assert (settings.block, settings.t, settings.resolution) == (best["block"], best["t"], 64)


def test_an_interrupted_sweep_resumes_without_recomputing(flux_pipeline_dir, tmp_path, monkeypatch):
    import ditf.features.featurizer as featurizer

    dataset = subset_pairs(load_spair(MINI), 4, 0)
    extractor = DiTFExtractor(str(flux_pipeline_dir), block=28, t=100, ensemble=1, resolution=64, device="cpu")
    calls, original = [], featurizer.DiTFeaturizer.extract

    def counted(self, *args, **kwargs):
        if len(calls) == limit:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(featurizer.DiTFeaturizer, "extract", counted)
    limit = 5
    with pytest.raises(KeyboardInterrupt):
        sweep(dataset, extractor, [19, 28], [100, 261], cache_dir=tmp_path / "cache", progress=False)
    limit = None
    resumed = sweep(dataset, extractor, [19, 28], [100, 261], cache_dir=tmp_path / "cache", progress=False)
    images = len(dataset.images())
    assert len(calls) == 2 * images  # one forward pass per image and timestep, none repeated after the kill
    calls.clear()
    again = sweep(dataset, extractor, [19, 28], [100, 261], cache_dir=tmp_path / "cache", progress=False)
    assert calls == [] and again["per_point"] == resumed["per_point"]
    fresh = sweep(dataset, extractor, [19, 28], [100, 261], cache_dir=tmp_path / "fresh", progress=False)
    assert fresh["per_point"] == resumed["per_point"] and fresh["per_image"] == resumed["per_image"]


def test_shards_of_a_sweep_fill_the_cache_for_the_final_run(flux_pipeline_dir, tmp_path, capsys):
    for shard in ("0/2", "1/2"):
        assert run_sweep(flux_pipeline_dir, tmp_path, "--shard", shard) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shard"] == shard
    assert not (tmp_path / "sweep" / "sweep.json").exists()
    assert run_sweep(flux_pipeline_dir, tmp_path) == 0
    assert (tmp_path / "sweep" / "sweep.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--blocks", "20-40"], r"--blocks 20-40: block 40 is out of range for FluxTransformer2DModel: valid blocks are "
                            r"0\.\.28"),
    (["--t", ","], r"--t ',' lists no timestep"),
    (["--t", "100,2000"], r"--t 2000\.0 is outside 0\.\.1000"),
    (["--pairs", "0"], r"--pairs 0: give at least 1"),
    (["--threads", "0"], r"--threads 0: give at least 1"),
    (["--blocks", "9-3"], r"--blocks '9-3': '9-3' is not a range"),
    (["--pairs", "1000"], r"--pairs 1000: the spair-71k test split has only 26 pairs; ask for at most 26"),
])
def test_bad_sweeps_name_the_value_and_the_fix(flux_pipeline_dir, tmp_path, capsys, extra, message):
    import re

    assert run_sweep(flux_pipeline_dir, tmp_path, *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.rglob("*.safetensors"))  # refused before any extraction


def test_a_preset_file_with_unknown_keys_is_refused_naming_the_key(tmp_path, capsys):
    presets = tmp_path / "p.toml"
    presets.write_text('[presets."sd3.5-medium"]\nblock = 8\ntimestep = 150\n')
    with pytest.raises(UnknownModelError, match=r"unknown keys \['timestep'\]; valid keys are model, family, block, t"):
        read_preset_file(presets)
    assert main(["presets", "--presets", str(presets)]) == 2
    assert "timestep" in capsys.readouterr().err
    presets.write_text('[presets."sd3.5-medium"]\nblock = 8\n')
    with preset_files([presets]):
        assert get_preset("sd3.5-medium").block == 8 and get_preset("sd3.5-medium").t == 261  # the rest stays built-in
    assert get_preset("sd3.5-medium").block == 12  # only while the file is in force


def test_block_lists_parse_ranges_with_steps():
    assert parse_blocks("4-22:6") == [4, 10, 16, 22] and parse_blocks("12,3,3") == [3, 12]
    assert parse_indices("-1,3-7:2", "steps") == [-1, 3, 5, 7]  # massive's steps: a lone negative counts from the end
    with pytest.raises(InvalidArgumentError, match=r"blocks='-1': '-1' is not a range of indices"):
        parse_blocks("-1")
