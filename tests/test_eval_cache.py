"""Feature sources: the crash-safe cache, precomputed folders, shards, and the model-backed extractor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ditf.cli import main
from ditf.errors import DatasetError, InvalidArgumentError
from ditf.eval import DiTFExtractor, evaluate_spair
from ditf.eval.cache import CorruptCacheEntryWarning
from ditf.eval.keypoints import ImageRecord
from ditf.eval.prompts import PromptPolicy
from ditf.eval.protocol import protocol_for
from ditf.eval.scoring import score_pairs
from ditf.eval.sharding import extract_shard, parse_shard, shard_images
from ditf.eval.sources import CachedExtractor, FeatureFolder
from ditf.eval.spair import load_spair
from ditf.io import write_json_atomic
from ditf.settings import VARIANTS

REAL = Path(__file__).parent / "fixtures" / "spair_real"
EXPECTED = json.loads((REAL / "expected_pck.json").read_text())
SETTINGS = {"model": "fixture", "block": 28, "t": 261.0}


class FixtureFeatures:
    """An extractor that serves the fixture's precomputed maps and records its calls."""

    prompt_mode = "empty"

    def __init__(self, fail_after: int | None = None, settings: dict | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_after = fail_after
        self.settings = settings or SETTINGS

    def describe(self) -> dict:
        return self.settings

    def __call__(self, image_path: Path, prompt: str) -> torch.Tensor:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append((image_path.name, prompt))
        return load_file(REAL / "features" / "aeroplane" / f"{image_path.stem}.safetensors")["features"]


@pytest.fixture(scope="module")
def dataset():
    return load_spair(REAL)


def score(dataset, source) -> float:
    return score_pairs(dataset, source, protocol_for(dataset), progress=False)["all_per_point"]


def cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def test_each_image_is_extracted_once_and_a_new_run_reuses_the_cache(dataset, tmp_path):
    first = FixtureFeatures()
    assert score(dataset, CachedExtractor(first, tmp_path)) == EXPECTED["all_per_point"]
    assert len(first.calls) == 4 and len(cache_entries(tmp_path)) == 4
    second = FixtureFeatures()
    assert score(dataset, CachedExtractor(second, tmp_path)) == EXPECTED["all_per_point"]
    assert second.calls == []


def test_a_killed_run_resumes_with_only_complete_entries(dataset, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        score(dataset, CachedExtractor(FixtureFeatures(fail_after=2), tmp_path))
    assert len(cache_entries(tmp_path)) == 2 and not list(tmp_path.rglob("*.tmp"))
    resumed = FixtureFeatures()
    assert score(dataset, CachedExtractor(resumed, tmp_path)) == EXPECTED["all_per_point"]
    assert len(resumed.calls) == 2


def test_truncated_or_altered_entries_are_detected_and_recomputed(dataset, tmp_path):
    score(dataset, CachedExtractor(FixtureFeatures(), tmp_path))
    truncated, altered = cache_entries(tmp_path)[:2]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data: same length, valid header
    altered.write_bytes(bytes(data))
    again = FixtureFeatures()
    with pytest.warns(CorruptCacheEntryWarning, match="will be recomputed"):
        assert score(dataset, CachedExtractor(again, tmp_path)) == EXPECTED["all_per_point"]
    assert len(again.calls) == 2


def test_the_key_covers_image_content_settings_and_prompt(tmp_path):
    image_path = tmp_path / "cat" / "a.jpg"
    image_path.parent.mkdir()
    Image.new("RGB", (8, 8)).save(image_path)
    image = ImageRecord(path=image_path, group="cat", size=(8, 8))
    base = CachedExtractor(FixtureFeatures(), tmp_path / "cache")
    key = base.key_for(image)
    other_t = FixtureFeatures(settings={**SETTINGS, "t": 90.0})
    assert CachedExtractor(other_t, tmp_path / "cache").key_for(image) != key
    assert CachedExtractor(FixtureFeatures(), tmp_path / "cache", PromptPolicy("class")).key_for(image) != key
    Image.new("RGB", (8, 8), color=(200, 30, 0)).save(image_path)  # same name, new content
    assert CachedExtractor(FixtureFeatures(), tmp_path / "cache").key_for(image) != key


def test_half_precision_storage_returns_identical_maps_when_resumed(dataset, tmp_path):
    image = dataset.images()[0]
    fresh = CachedExtractor(FixtureFeatures(), tmp_path, storage_dtype=torch.float16).load(image)
    resumed = CachedExtractor(FixtureFeatures(), tmp_path, storage_dtype=torch.float16).load(image)
    assert fresh.dtype == torch.float16 and torch.equal(fresh, resumed)


def test_feature_folder_names_missing_and_malformed_files(dataset, tmp_path):
    features = Path(shutil.copytree(REAL / "features", tmp_path / "features"))
    folder = FeatureFolder(features)
    image = dataset.images()[0]
    path = features / "aeroplane" / f"{image.stem}.safetensors"
    for tensors, message in [
        ({"features": torch.zeros(1, 48, 27, 40)}, r"shape \(1, 48, 27, 40\); expected \(C, h, w\)"),
        ({"features": torch.zeros(48, 27, 40, dtype=torch.int32)}, "dtype I32"),
        ({"feats": torch.zeros(48, 27, 40)}, "no 'features'"),
    ]:
        save_file(tensors, path)
        with pytest.raises(DatasetError, match=message):
            folder.load(image)
    path.unlink()
    with pytest.raises(DatasetError, match=f"{image.stem}.safetensors does not exist"):
        folder.load(image)
    with pytest.raises(DatasetError, match="1 of 4 images have no features"):
        score(dataset, folder)


class Batched(FixtureFeatures):
    def __call__(self, image_path: Path, prompt: str) -> torch.Tensor:
        return torch.zeros(1, 4, 2, 2)


def test_extractor_output_is_checked(dataset, tmp_path):
    with pytest.raises(DatasetError, match="extractor output .* shape \\(1, 4, 2, 2\\)"):
        CachedExtractor(Batched(), tmp_path).load(dataset.images()[0])


def test_shards_partition_the_images_and_scoring_waits_for_all_of_them(dataset, tmp_path, monkeypatch):
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "2", "-1/2"):
        with pytest.raises(InvalidArgumentError, match="0 <= i < n"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard("auto") == (1, 2)

    images = dataset.images()
    shards = [shard_images(images, i, 3) for i in range(3)]
    assert sorted(image.key for shard in shards for image in shard) == sorted(image.key for image in images)

    first = FixtureFeatures()
    summary = extract_shard(dataset, CachedExtractor(first, tmp_path), (0, 2), progress=False)
    assert summary == {"shard": "0/2", "images": 2, "extracted": 2, "missing_in_dataset": 2}
    scorer = CachedExtractor(FixtureFeatures(), tmp_path, cache_only=True)
    with pytest.raises(DatasetError, match="2 of 4 images have no features .* every --shard i/n"):
        score(dataset, scorer)
    extract_shard(dataset, CachedExtractor(FixtureFeatures(), tmp_path), (1, 2), progress=False)
    assert score(dataset, scorer) == EXPECTED["all_per_point"]


class FakeFeaturizer:
    """Stands in for ditf.DiTFeaturizer: records how it is built and called, serves fixture maps."""

    loads: list[tuple[str, dict]] = []
    calls: list[dict] = []

    @classmethod
    def from_pretrained(cls, model: str, **kwargs):
        cls.loads.append((model, kwargs))
        return cls()

    def extract(self, image, settings):
        self.calls.append({"image": image, "settings": settings})
        if isinstance(image, Image.Image):  # the square-padded image of --protocol geoaware
            assert image.size[0] == image.size[1]
            return FakeResult(torch.arange(8 * 16, dtype=torch.float32).reshape(8, 4, 4))
        return FakeResult(load_file(REAL / "features" / "aeroplane" / f"{Path(image).stem}.safetensors")["features"])


class FakeResult:
    def __init__(self, features):
        self.features = features


@pytest.fixture
def fake_featurizer(monkeypatch):
    import ditf.features.featurizer

    FakeFeaturizer.loads, FakeFeaturizer.calls = [], []
    monkeypatch.setattr(ditf.features.featurizer, "DiTFeaturizer", FakeFeaturizer)
    return FakeFeaturizer


def test_the_model_is_loaded_lazily_up_to_the_block_with_the_variant_settings(dataset, tmp_path, fake_featurizer):
    extractor = DiTFExtractor("ditf-tests/tiny-model", task="spair", variant="raw", block=3, t=261, ensemble=2, resolution=64,
                              dtype="fp32", device="cpu")
    source = CachedExtractor(extractor, tmp_path, PromptPolicy(extractor.prompt_mode))
    assert fake_featurizer.loads == [] and extractor.prompt_mode == "class"
    source.load(dataset.images()[0])
    source.load(dataset.images()[1])
    assert fake_featurizer.loads == [("ditf-tests/tiny-model", {"torch_dtype": torch.float32, "device": "cpu", "block": 3,
                                                     "offload": None, "config": None, "variant": None,
                                                     "revision": None})]
    settings = fake_featurizer.calls[0]["settings"]
    assert settings.prompt == "a photo of a aeroplane"
    assert (settings.normalize, settings.modulate, settings.discard, settings.variant) == (False, False, None, "raw")
    assert (settings.block, settings.t, settings.ensemble, settings.seed, settings.dtype) == (3, 261.0, 2, 0, "fp32")
    cached_only = CachedExtractor(extractor, tmp_path, PromptPolicy("class"), cache_only=True)
    assert cached_only.available(dataset.images()[0]) and not cached_only.available(dataset.images()[2])


def test_variants_and_preset_defaults():
    assert VARIANTS["ditf"] == {"normalize": True, "modulate": True, "discard": "auto"}
    assert VARIANTS["ln"] == {"normalize": True, "modulate": False, "discard": None}
    assert VARIANTS["adaln"] == {"normalize": True, "modulate": True, "discard": None}
    flux = DiTFExtractor("flux-dev", task="spair", device="cpu").describe()
    assert {k: flux[k] for k in ("block", "t", "ensemble", "resolution", "guidance", "dtype", "variant")} == {
        "block": 28, "t": 261.0, "ensemble": 8, "resolution": 640, "guidance": 3.5, "dtype": "fp32", "variant": "ditf"}


def test_baselines_key_the_cache_with_their_settings_and_published_prompt_mode(tmp_path):
    from ditf.baselines import BaselineExtractor

    extractor = BaselineExtractor("dinov2-b14")  # nothing is loaded until a feature is missing
    assert extractor.prompt_mode == "empty"
    assert {k: extractor.describe()[k] for k in ("baseline", "model", "resolution")} == {
        "baseline": "dinov2-b14", "model": "facebook/dinov2-base", "resolution": 840}


def test_geoaware_extraction_sees_the_square_padded_image(dataset, tmp_path, fake_featurizer):
    extractor = DiTFExtractor("ditf-tests/tiny-model", block=3, t=261, ensemble=1, resolution=64, device="cpu")
    with pytest.raises(DatasetError, match="h == w"):  # the fixture's maps are not square: only a padded image is
        evaluate_spair(REAL, features=REAL / "features", protocol="geoaware", progress=False)
    results = evaluate_spair(REAL, extractor=extractor, protocol="geoaware", pad_size=64, cache_dir=tmp_path,
                             progress=False)
    assert results["settings"]["frame"] == "square_pad_64"
    assert all(isinstance(call["image"], Image.Image) and call["image"].size == (64, 64)
               for call in fake_featurizer.calls)


def test_cli_shards_then_scores_from_the_cache(tmp_path, fake_featurizer, capsys):
    base = ["eval", "spair", "--root", str(REAL), "--model", "ditf-tests/tiny-model", "--block", "3", "--t", "261",
            "--ensemble", "1", "--resolution", "64", "--dtype", "fp32", "--device", "cpu",
            "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(base + ["--shard", "0/2"]) == 0
    assert '"missing_in_dataset": 2' in capsys.readouterr().out
    assert main(base + ["--cache-only", "--output", str(tmp_path / "r.json")]) == 2
    assert "2 of 4 images have no features" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert main(base + ["--shard", "1/2"]) == 0
    assert main(base + ["--cache-only", "--output", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["all_per_point"] == EXPECTED["all_per_point"]
    assert results["settings"]["model"] == "ditf-tests/tiny-model" and results["settings"]["variant"] == "ditf"
    assert len(fake_featurizer.loads) == 2  # one per shard process; the scoring run never loads the model


def test_merged_shards_of_a_real_model_score_exactly_as_one_run(flux_pipeline_dir, tmp_path):
    """Two shards filled separately, then scored from the cache, give the single run's results to the last bit."""
    extractor = DiTFExtractor(str(flux_pipeline_dir), block=20, t=261, ensemble=1, resolution=128, dtype="fp32",
                              device="cpu")
    single = evaluate_spair(REAL, extractor=extractor, cache_dir=tmp_path / "single", progress=False)
    for shard in ("0/2", "1/2"):
        summary = evaluate_spair(REAL, extractor=extractor, cache_dir=tmp_path / "sharded", shard=shard, progress=False)
        assert summary["shard"] == shard and summary["extracted"] == 2
    merged = evaluate_spair(REAL, extractor=extractor, cache_dir=tmp_path / "sharded", cache_only=True, progress=False)
    assert {k: v for k, v in merged.items() if k != "settings"} == {k: v for k, v in single.items() if k != "settings"}
    assert merged["pairs"] != json.loads((REAL / "expected_pck.json").read_text())["pairs"]  # a real model, not the fixture


def test_scoring_in_worker_processes_gives_the_same_results(dataset):
    one = score_pairs(dataset, FeatureFolder(REAL / "features"), protocol_for(dataset), progress=False)
    two = score_pairs(dataset, FeatureFolder(REAL / "features"), protocol_for(dataset), workers=2, progress=False)
    assert two == one and one["all_per_point"] == EXPECTED["all_per_point"]


class ThreadWatchingFolder(FeatureFolder):
    """A features folder that records torch's thread count whenever a map is read (that is, while scoring)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.threads: set[int] = set()

    def load(self, image: ImageRecord) -> torch.Tensor:
        self.threads.add(torch.get_num_threads())
        return super().load(image)


@pytest.mark.parametrize("threads, expected", [(None, 1), (2, 2)])
def test_cpu_scoring_runs_on_one_thread_unless_asked_and_restores_torch_setting(dataset, threads, expected):
    source = ThreadWatchingFolder(REAL / "features")
    torch.set_num_threads(2)  # the tests' default is 1 (conftest)
    try:
        scores = score_pairs(dataset, source, protocol_for(dataset), threads=threads, progress=False)
        assert source.threads == {expected} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert scores["all_per_point"] == EXPECTED["all_per_point"]
    with pytest.raises(InvalidArgumentError, match="threads=0"):
        score_pairs(dataset, source, protocol_for(dataset), threads=0, progress=False)


def test_the_command_line_passes_threads_to_scoring(monkeypatch, capsys):
    seen: list[int] = []
    read = FeatureFolder.load
    monkeypatch.setattr(FeatureFolder, "load",
                        lambda self, image: seen.append(torch.get_num_threads()) or read(self, image))
    argv = ["eval", "spair", "--root", str(REAL), "--features", str(REAL / "features"), "--quiet"]
    torch.set_num_threads(2)
    try:
        for extra, expected in (([], 1), (["--threads", "2"], 2)):
            seen.clear()
            assert main(argv + extra) == 0 and set(seen) == {expected}
    finally:
        torch.set_num_threads(1)
    assert main(argv + ["--threads", "0"]) == 2 and "--threads 0: give at least 1" in capsys.readouterr().err


def test_results_are_written_atomically(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"all_per_point": 1.0})
    with pytest.raises(InvalidArgumentError, match="cannot write"):
        write_json_atomic(path, {"all_per_point": object()})
    with pytest.raises(InvalidArgumentError, match=r"\$.per_category.cat"):
        write_json_atomic(path, {"per_category": {"cat": float("nan")}})
    assert json.loads(path.read_text()) == {"all_per_point": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ------------------------------------------------------------------ what a cache entry is keyed by
def test_a_model_is_keyed_by_its_files_not_by_how_its_path_is_spelt(flux_pipeline_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file as read, save_file as write

    from ditf.fingerprint import model_identity

    folder = Path(shutil.copytree(flux_pipeline_dir, tmp_path / ".smoke"))  # a hidden folder still has its files
    monkeypatch.chdir(tmp_path)
    spellings = [model_identity(name) for name in (".smoke", "./.smoke", str(folder), str(folder) + "/")]
    assert all(identity == spellings[0] for identity in spellings)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = read(weights)
    image = load_spair(REAL).images()[0]
    settings = dict(block=20, t=261, ensemble=1, resolution=64, device="cpu")
    keys = {CachedExtractor(DiTFExtractor(name, **settings), tmp_path / "cache").key_for(image)
            for name in (".smoke", "./.smoke", str(folder))}
    assert len(keys) == 1  # the whole cache key, not only the identity
    assert DiTFExtractor("./.smoke", **settings).describe()["model"] == "./.smoke"  # results say it as typed
    write({name: tensor + 1 for name, tensor in tensors.items()}, weights)  # other weights, same names and shapes
    assert model_identity(".smoke") != spellings[0]
    assert model_identity("flux-dev") == {"kind": "hub", "repo": "black-forest-labs/FLUX.1-dev", "revision": None}


def test_the_command_line_and_the_library_share_cache_entries_and_storage_dtypes_do_not(flux_pipeline_dir, tmp_path):
    from ditf.cli import build_parser
    from ditf.cli.eval_sources import source_options
    from ditf.eval.api import feature_source

    image = load_spair(REAL).images()[0]
    args = build_parser().parse_args(["eval", "spair", "--root", str(REAL), "--model", str(flux_pipeline_dir),
                                      "--cache", str(tmp_path), "--device", "cpu", "--block", "20", "--t", "261",
                                      "--ensemble", "2"])
    options = source_options(args, task="spair")
    from_cli = feature_source(extractor=options["extractor"], cache_dir=tmp_path, prompt_mode="class")
    library = DiTFExtractor(str(flux_pipeline_dir), task="spair", device="cpu", block=20, t=261,
                            ensemble=2)  # dtype filled in as the CLI does
    from_library = feature_source(extractor=library, cache_dir=tmp_path, prompt_mode="class")
    assert from_cli.key_for(image) == from_library.key_for(image)
    in_fp16 = feature_source(extractor=library, cache_dir=tmp_path, prompt_mode="class", cache_dtype="float16")
    assert in_fp16.key_for(image) != from_library.key_for(image)


def test_changed_weights_miss_the_cache(flux_pipeline_dir, tmp_path):
    folder = Path(shutil.copytree(flux_pipeline_dir, tmp_path / "model"))
    settings = dict(block=20, t=261, ensemble=1, resolution=64, device="cpu")
    image = load_spair(REAL).images()[0]
    before = CachedExtractor(DiTFExtractor(str(folder), **settings), tmp_path / "cache").key_for(image)
    config = folder / "transformer" / "config.json"
    config.write_text(config.read_text())  # rewritten: a new modification time, as after a new download
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert CachedExtractor(DiTFExtractor(str(folder), **settings), tmp_path / "cache").key_for(image) != before


def test_two_workers_on_one_cache_compute_each_entry_once(dataset, tmp_path):
    """The second (a thread here; the lock is a file lock, so processes too) asks for an entry while the first
    computes it: it waits for the lock, then reads the entry."""
    import threading
    import time

    started = threading.Event()

    class Slow(FixtureFeatures):
        def __call__(self, image_path, prompt):
            started.set()
            time.sleep(0.3)
            return super().__call__(image_path, prompt)

    first, second = Slow(), FixtureFeatures()
    image = dataset.images()[0]
    results = {}
    worker = threading.Thread(target=lambda: results.update(first=CachedExtractor(first, tmp_path).load(image)))
    worker.start()
    started.wait(5)
    results["second"] = CachedExtractor(second, tmp_path).load(image)
    worker.join()
    assert len(first.calls) == 1 and second.calls == []
    assert torch.equal(results["first"], results["second"])


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    from ditf.io import _HOST, write_text_atomic

    target = tmp_path / "results.json"
    orphan = tmp_path / f".results.json.{_HOST}.999999999.deadbeef.tmp"  # a pid that no process has
    live = tmp_path / f".results.json.{_HOST}.{os.getpid()}.cafe0000.tmp"  # this process: a live writer
    orphan.write_text("half")
    live.write_text("being written")
    write_text_atomic(target, "{}")
    assert not orphan.exists() and live.exists() and target.read_text() == "{}"
