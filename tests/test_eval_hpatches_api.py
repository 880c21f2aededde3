"""`evaluate_hpatches` and `ditf eval hpatches`: DIFT's results on hpatches_mini from a features folder, from a
cached extractor and from the command line; DIFT's 768x768 image size for --model; a tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditf.cli import main
from ditf.cli.eval_hpatches import hpatches_settings
from ditf.eval import evaluate_hpatches
from ditf.registry import preset_for
from ditf.settings import resolve_settings
from test_eval_hpatches import EXPECTED, FEATURES, KEYPOINTS, copy_tree, paint_image

subset_is_known = pytest.mark.filterwarnings("ignore::ditf.eval.hpatches_dataset.HPatchesSubsetWarning")
"""hpatches_mini has 4 of the 108 sequences: every test but the one that checks the warning silences it."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The fixture tree with a different picture for every image: the feature cache keys images by content."""
    tree = copy_tree(tmp_path_factory.mktemp("hpatches_api"))
    for number, image in enumerate(sorted(tree.glob("*/*.ppm"))):
        paint_image(image, seed=100 + number)
    return tree


def assert_dift_results(results: dict, mode: str) -> None:
    """Every pair's match count equal to DIFT's, corner errors within 0.02 px, accuracies equal."""
    expected = EXPECTED[mode]
    assert results["per_pair"].keys() == expected["per_pair"].keys()
    for name, pair in expected["per_pair"].items():
        assert results["per_pair"][name]["matches"] == pair["matches"], name
        assert results["per_pair"][name]["mean_corner_error"] == pytest.approx(pair["mean_corner_error"], abs=0.02), name
    for group in ("overall", "i", "v", "thresholds"):
        assert results[group] == expected[group], group


@subset_is_known
@pytest.mark.parametrize("mode", ["lmeds", "ransac"])
def test_a_features_folder_gives_dift_results(root, mode):
    results = evaluate_hpatches(root, features=FEATURES, keypoints=KEYPOINTS, mode=mode, progress=False)
    assert_dift_results(results, mode)
    assert results["settings"] == {"source": "features folder", "features": str(FEATURES)}
    assert results["protocol"]["mode"] == mode and "ditf_version" in results
    json.dumps(results, allow_nan=False)


class FixtureMaps:
    """An extractor serving hpatches_mini's maps for image `<sequence>/<k>.ppm`, counting calls."""

    prompt_mode = "empty"

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def describe(self) -> dict:
        return {"extractor": "hpatches-fixture"}

    def __call__(self, image_path: Path, prompt: str) -> torch.Tensor:
        self.calls.append((f"{image_path.parent.name}/{image_path.stem}", prompt))
        return load_file(FEATURES / image_path.parent.name / f"{image_path.stem}.safetensors")["features"]


@subset_is_known
def test_an_extractor_runs_once_per_image_through_the_cache(root, tmp_path):
    first = FixtureMaps()
    results = evaluate_hpatches(root, extractor=first, keypoints=KEYPOINTS, cache_dir=tmp_path, progress=False)
    assert_dift_results(results, "lmeds")
    assert len(first.calls) == 24 and {prompt for _, prompt in first.calls} == {""}  # DIFT: empty prompt
    assert results["settings"]["extractor"] == "hpatches-fixture" and results["settings"]["cache"] == str(tmp_path)
    again = FixtureMaps()
    assert evaluate_hpatches(root, extractor=again, keypoints=KEYPOINTS, cache_dir=tmp_path,
                             progress=False)["per_pair"] == results["per_pair"]
    assert again.calls == []


@subset_is_known
def test_shards_fill_the_cache_then_cache_only_scores(root, tmp_path):
    extractor = FixtureMaps()
    halves = [evaluate_hpatches(root, extractor=extractor, keypoints=KEYPOINTS, cache_dir=tmp_path, shard=shard,
                                progress=False) for shard in ("0/2", "1/2")]
    assert [half["images"] for half in halves] == [12, 12] and halves[1]["missing_in_dataset"] == 0
    scored = evaluate_hpatches(root, extractor=FixtureMaps(), keypoints=KEYPOINTS, cache_dir=tmp_path,
                               cache_only=True, progress=False)
    assert_dift_results(scored, "lmeds")


def test_cli_writes_json_with_the_card_and_a_plot(root, tmp_path, capsys):
    output, plot = tmp_path / "hp.json", tmp_path / "hp.png"
    code = main(["eval", "hpatches", "--root", str(root), "--features", str(FEATURES), "--keypoints", str(KEYPOINTS),
                 "--mode", "ransac", "--output", str(output), "--plot", str(plot), "--quiet"])
    assert code == 0
    results = json.loads(output.read_text())
    assert_dift_results(results, "ransac")
    assert {"overall", "i", "v", "thresholds", "per_pair", "protocol", "benchmark"} <= set(results)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "protocol card: dift-hpatches" in printed.out and "cv2.RANSAC" in printed.out
    assert "ditf: warning: evaluating 4 HPatches sequences" in printed.err and "Traceback" not in printed.err


def test_model_features_use_dift_image_size():
    settings = resolve_settings(preset_for("flux-dev"), task="hpatches", model="flux-dev")
    assert (settings.size, settings.resolution, settings.prompt) == ((768, 768), None, "")
    assert "DIFT" in settings.sources["size"] and "no published hpatches setting" in settings.sources["block"]
    args = dict(model="flux-dev", dtype=None, resolution=None, size=None, block=None, t=None, ensemble=None,
                pad_square=None, prompt=None, discard=None, massive_ratio=None, guidance=None, seed=None,
                vae_sample=None, variant=None, max_batch=None)
    import argparse

    assert hpatches_settings(argparse.Namespace(**args)).size == (768, 768)
    resized = hpatches_settings(argparse.Namespace(**{**args, "resolution": 512}))
    assert (resized.size, resized.resolution) == (None, 512)


@subset_is_known
def test_a_tiny_model_runs_end_to_end(root, flux_pipeline_dir, tmp_path):
    output = tmp_path / "hp.json"
    code = main(["eval", "hpatches", "--root", str(root), "--model", str(flux_pipeline_dir), "--block", "21", "--t",
                 "261", "--ensemble", "1", "--size", "64x64", "--dtype", "fp32", "--device", "cpu", "--keypoints",
                 "grid", "--sequences", "v_case21_3", "--cache", str(tmp_path / "cache"), "-o", str(output),
                 "--quiet"])
    assert code == 0
    results = json.loads(output.read_text())
    assert list(results["per_pair"]) == [f"v_case21_3/{k}" for k in range(2, 7)]
    assert results["settings"]["size"] == [64, 64] and results["settings"]["extractor"] == "ditf"
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6
