"""`evaluate_ade20k`, `ditf eval ade20k` and `ditf eval seg-score`: mmsegmentation's scores on ade20k_mini from the
command line, and a probe on separable synthetic features, cached and streamed, from the library and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditf.cli import main
from ditf.eval import ProbeSettings, evaluate_ade20k
from ditf.registry import preset_for
from ditf.settings import resolve_settings
from test_eval_segmentation import EXPECTED, FIXTURE, PREDICTIONS, PrototypeFeatures, make_synthetic_ade20k


def strict_json(path: Path) -> dict:
    """The file's JSON, refusing the non-standard NaN / Infinity tokens."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_seg_score_cli_equals_mmsegmentation(tmp_path, capsys):
    output, plot = tmp_path / "miou.json", tmp_path / "iou.png"
    assert main(["eval", "seg-score", "--root", str(FIXTURE), "--predictions", str(PREDICTIONS), "--output",
                 str(output), "--plot", str(plot), "--quiet"]) == 0
    scores = strict_json(output)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert scores[key] == pytest.approx(EXPECTED[key], abs=1e-4), key
    assert scores["per_class"].keys() == EXPECTED["per_class"].keys()
    for class_id, expected in EXPECTED["per_class"].items():
        for key, value in expected.items():
            got = scores["per_class"][class_id][key]
            assert got is None if math.isnan(value) else got == pytest.approx(value, abs=1e-4), (class_id, key)
    assert scores["per_class"]["53"]["Acc"] is None  # only predicted: mmsegmentation's NaN
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"mIoU {EXPECTED['mIoU']:.2f}" in printed and "nanmean over classes" in printed


class PrototypeExtractor:
    """An `Extractor` of separable features (`PrototypeFeatures`), counting how often it runs."""

    prompt_mode = "empty"

    def __init__(self):
        self.features = PrototypeFeatures()

    def describe(self) -> dict:
        return {"extractor": "prototypes"}

    def __call__(self, image_path: Path, prompt: str) -> torch.Tensor:
        return self.features(Path(image_path))


FAST = dict(steps=40, batch_size=4, learning_rate=0.05, warmup_steps=0, label_short_side=None, checkpoint_every=10,
            seed=3)


def test_probe_trains_on_cached_features_read_one_batch_at_a_time(tmp_path, monkeypatch):
    root = make_synthetic_ade20k(tmp_path / "data")
    extractor = PrototypeExtractor()
    reads: list[int] = []
    from ditf.eval.cache import FeatureCache

    original = FeatureCache.load
    monkeypatch.setattr(FeatureCache, "load", lambda self, key: reads.append(1) or original(self, key))
    results = evaluate_ade20k(root, tmp_path / "run", extractor=extractor, probe_settings=FAST,
                              cache_dir=tmp_path / "cache", device="cpu", progress=False)
    assert results["scores"]["mIoU"] >= 95
    assert extractor.features.calls == 12  # each of the 8 + 4 images extracted once ...
    assert len(reads) >= 40 * 4  # ... and read back from the cache for every step's batch
    assert results["features"] == {"source": "extractor", "extractor": "prototypes", "stored_as": "as extracted",
                                   "prompt_mode": "empty"}
    assert results["training"]["settings"]["head"] == "linear"
    assert (tmp_path / "run" / "train" / "loss_curve.png").is_file()
    assert strict_json(tmp_path / "run" / "results.json")["scores"]["mIoU"] >= 95
    prediction = Image.open(tmp_path / "run" / "pred" / "ADE_valid_00000000.png")
    assert prediction.mode == "L" and prediction.size == (32, 32)


def test_cli_trains_from_a_features_folder_and_resumes(tmp_path, capsys):
    root = make_synthetic_ade20k(tmp_path / "data")
    features = tmp_path / "features"
    prototypes = PrototypeFeatures()
    for image in sorted((root / "ADEChallengeData2016" / "images").rglob("*.jpg")):
        (features / image.parent.name).mkdir(parents=True, exist_ok=True)
        save_file({"features": prototypes(image).contiguous()}, features / image.parent.name / f"{image.stem}.safetensors")
    argv = ["eval", "ade20k", "--root", str(root), "--features", str(features), "--probe", "linear", "--steps", "40",
            "--batch-size", "4", "--learning-rate", "0.05", "--warmup-steps", "0", "--label-short-side", "32",
            "--checkpoint-every", "10", "--probe-seed", "3", "--device", "cpu", "--quiet", "-o", str(tmp_path / "seg")]
    assert main(argv) == 0
    results = strict_json(tmp_path / "seg" / "results.json")
    assert results["scores"]["mIoU"] >= 95 and results["training"]["resumed_from_step"] == 0
    assert "probe card:" in capsys.readouterr().out
    assert main(argv) == 0  # a finished run is picked up, not retrained
    assert strict_json(tmp_path / "seg" / "results.json")["training"]["resumed_from_step"] == 40
    assert main(["eval", "seg-score", "--root", str(root), "--predictions", str(tmp_path / "seg" / "pred"), "--quiet",
                 "-o", str(tmp_path / "again.json")]) == 0
    assert strict_json(tmp_path / "again.json")["mIoU"] == results["scores"]["mIoU"]


def test_shards_fill_the_cache_for_both_splits(tmp_path):
    root = make_synthetic_ade20k(tmp_path / "data", train_images=3, val_images=2)
    extractor = PrototypeExtractor()
    first = evaluate_ade20k(root, tmp_path / "run", extractor=extractor, cache_dir=tmp_path / "cache", shard="0/2",
                            progress=False)
    second = evaluate_ade20k(root, tmp_path / "run", extractor=extractor, cache_dir=tmp_path / "cache", shard="1/2",
                             progress=False)
    assert (first["images"], second["images"], second["missing_in_dataset"]) == (3, 2, 0)
    assert extractor.features.calls == 5 and not (tmp_path / "run").exists()


def test_ade20k_task_preset_says_what_is_unpublished():
    settings = resolve_settings(preset_for("flux-dev"), task="ade20k", model="flux-dev")
    assert (settings.resolution, settings.prompt) == (640, "")
    assert "no published ade20k setting" in settings.sources["block"]
    assert ProbeSettings().head == "linear" and ProbeSettings().steps == 40_000  # DINOv2's linear protocol
