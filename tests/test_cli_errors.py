"""Bad input through the real command line: exit code 2, one message that names the input and the fix, no
traceback, no output file left behind. One row per mistake a user makes (and some they rarely do)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditf.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"
FIXTURES = Path(__file__).parent / "fixtures"
SPAIR = FIXTURES / "spair_real"
DAVIS = FIXTURES / "davis_mini" / "DAVIS"
ADE = FIXTURES / "ade20k_mini"
HP_FEATURES, HP_KEYPOINTS = FIXTURES / "hpatches_mini" / "features", FIXTURES / "hpatches_mini" / "keypoints"
CAT1, CAT2 = str(EXAMPLES / "cat1.jpg"), str(EXAMPLES / "cat2.jpg")
SMALL = ["--block", "21", "--t", "261", "--ensemble", "1", "--resolution", "64", "--dtype", "fp32", "--device", "cpu"]
GEN = ["--num-inference-steps", "1", "--height", "64", "--width", "64", "--device", "cpu"]


@dataclass
class World:
    """Files the rows point at: a good model, broken copies of it, broken images and feature folders."""

    model: Path
    out: Path
    broken: dict[str, Path]
    files: dict[str, Path]


def _broken_models(model: Path, root: Path) -> dict[str, Path]:
    """Copies of the tiny FLUX pipeline, each with one part missing or damaged."""
    def copy(name: str, damage: Callable[[Path], None]) -> Path:
        folder = Path(shutil.copytree(model, root / name))
        damage(folder)
        return folder

    weights = "transformer/diffusion_pytorch_model.safetensors"
    return {
        "no_vae": copy("no_vae", lambda f: shutil.rmtree(f / "vae")),
        "no_text_encoder_2": copy("no_text_encoder_2", lambda f: shutil.rmtree(f / "text_encoder_2")),
        "no_tokenizer_2": copy("no_tokenizer_2", lambda f: shutil.rmtree(f / "tokenizer_2")),
        "truncated": copy("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:-1000])),
        "bad_header": copy("bad_header", lambda f: (f / weights).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\x00" * 64)),
        "empty_index": copy("empty_index", lambda f: (f / "model_index.json").write_text("")),
        "bad_config": copy("bad_config", lambda f: (f / "transformer" / "config.json").write_text("{'single': quotes}")),
        "no_weights": copy("no_weights", lambda f: (f / weights).unlink()),
    }


def _hpatches_and_ade20k(root: Path) -> dict[str, Path]:
    """An hpatches_mini tree with images, and broken copies of it, of its keypoints and maps, of ade20k_mini and of
    its predictions; spair_real's maps with one of 16 channels."""
    from safetensors.torch import load_file
    from test_eval_hpatches import FEATURES as HP_FEATURES
    from test_eval_hpatches import KEYPOINTS as HP_KEYPOINTS
    from test_eval_hpatches import copy_tree

    made = {"hpatches": copy_tree(root / "hp"), "hpatches_partial": copy_tree(root / "hp_partial", ["i_case21_0"])}
    (made["hpatches_partial"] / "i_case21_0" / "H_1_4").unlink()
    for kind, text in (("3col", "10 20 0.9\n30 40 0.8\n"), ("outside", "10 20\n900 40\n")):
        folder = Path(shutil.copytree(HP_KEYPOINTS, root / f"kp_{kind}"))
        (folder / "i_case21_0-1.kp").write_text(text)
        made[f"kp_{kind}"] = folder
    narrow = Path(shutil.copytree(HP_FEATURES, root / "hp_features_narrow")) / "v_case21_1" / "3.safetensors"
    save_file({"features": load_file(narrow)["features"][:16].contiguous()}, narrow)
    made["hp_features_narrow"] = narrow.parent.parent
    spair_narrow = Path(shutil.copytree(SPAIR / "features", root / "features_narrow")) / "aeroplane" / "2008_004100.safetensors"
    save_file({"features": load_file(spair_narrow)["features"][:16].contiguous()}, spair_narrow)
    made["features_narrow"] = spair_narrow.parent.parent
    ade = Path(shutil.copytree(ADE, root / "ade_partial"))
    (ade / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_04100003.png").unlink()
    made["ade_partial"] = ade
    for kind in ("wrong_size", "id_151", "missing"):
        folder = Path(shutil.copytree(ADE / "predictions", root / f"pred_{kind}"))
        target = folder / "ADE_val_04100001.png"
        if kind == "wrong_size":
            Image.fromarray(np.ones((10, 12), np.uint8)).save(target)
        elif kind == "id_151":
            ids = np.array(Image.open(target))
            ids[0, 0] = 151
            Image.fromarray(ids).save(target)
        else:
            target.unlink()
        made[f"pred_{kind}"] = folder
    (root / "empty").mkdir()
    made["empty"] = root / "empty"
    return made


def _feature_folders(root: Path) -> dict[str, Path]:
    """spair_real's maps, with one map made NaN, constant or transposed."""
    made = {}
    for kind in ("nan", "constant", "transposed"):
        folder = Path(shutil.copytree(SPAIR / "features", root / f"features_{kind}"))
        target = folder / "aeroplane" / "2008_004100.safetensors"
        from safetensors.torch import load_file

        features = load_file(target)["features"]
        if kind == "nan":
            features[0, 0, 0] = float("nan")
        elif kind == "constant":
            features = torch.full_like(features, 0.5)
        else:
            features = features.transpose(1, 2).contiguous()
        save_file({"features": features}, target)
        made[kind] = folder
    return made


@pytest.fixture(scope="module")
def world(flux_pipeline_dir, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    files = {
        "not_an_image": root / "notes.jpg",
        "huge": root / "huge.png",
        "a_file": root / "a_file.txt",
        "read_only": root / "read_only",
        "captions_broken": root / "captions.json",
    }
    files["not_an_image"].write_text("this is not a JPEG")
    Image.new("L", (200, 150)).save(files["huge"])
    files["a_file"].write_text("a file, not a folder")
    files["read_only"].mkdir()
    files["captions_broken"].write_text("{not json")
    files.update({f"features_{k}": v for k, v in _feature_folders(root).items()})
    files.update(_hpatches_and_ade20k(root))
    return World(flux_pipeline_dir, root / "out", _broken_models(flux_pipeline_dir, root), files)


def rows() -> list[tuple[str, Callable[[World], list[str]], str]]:
    """(id, argv from the world, regex the message must match)."""
    m = lambda w: str(w.model)  # noqa: E731
    o = lambda w, name="x": str(w.out / name)  # noqa: E731
    feats = lambda w, *extra: ["features", CAT1, "--model", m(w), "-o", o(w), *SMALL, *extra]  # noqa: E731
    match = lambda w, *extra: ["match", CAT1, CAT2, "--points", "10,10", "--model", m(w), *SMALL, *extra]  # noqa: E731
    spair = lambda *extra: ["eval", "spair", "--root", str(SPAIR), "--quiet", *extra]  # noqa: E731
    davis = lambda w, *extra: ["eval", "davis", "--root", str(DAVIS), "--model", m(w), "-o", o(w), "--quiet", *SMALL[:2],  # noqa: E731
                               "--dtype", "fp32", "--device", "cpu", *extra]
    hp = lambda w, *extra, root="hpatches": ["eval", "hpatches", "--root", str(w.files[root]), "--quiet", *extra]  # noqa: E731
    ade = lambda w, *extra: ["eval", "ade20k", "--root", str(w.files["ade_partial"]), "--quiet", "-o", o(w), *extra]  # noqa: E731
    seg = lambda *extra: ["eval", "seg-score", "--root", str(ADE), "--quiet", *extra]  # noqa: E731
    scan = lambda w, *extra: ["massive", "scan", "--model", m(w), "-o", o(w), *GEN, *extra]  # noqa: E731
    gen = lambda w, cmd, *extra: ["massive", *cmd, "--model", m(w), "--prompt", "a cat", *GEN, *extra]  # noqa: E731
    return [
        # ---- features: settings
        ("ensemble-0", lambda w: feats(w, "--ensemble", "0"), r"--ensemble 0 must be at least 1"),
        ("ensemble-negative", lambda w: feats(w, "--ensemble", "-3"), r"--ensemble -3 must be at least 1"),
        ("max-batch-0", lambda w: feats(w, "--max-batch", "0"), r"--max-batch 0: give at least 1"),
        ("max-batch-negative", lambda w: feats(w, "--max-batch", "-1"), r"--max-batch -1: give at least 1"),
        ("t-too-large", lambda w: feats(w, "--t", "1261"), r"--t 1261.* outside 0\.\.1000"),
        ("t-negative", lambda w: feats(w, "--t", "-5"), r"--t -5.* outside 0\.\.1000"),
        ("t-nan", lambda w: feats(w, "--t", "nan"), r"--t nan.* outside 0\.\.1000"),
        ("block-out-of-range", lambda w: feats(w, "--block", "99"), r"--block 99 is out of range .* 0\.\.28"),
        ("resolution-below-stride", lambda w: feats(w, "--resolution", "8"), r"--resolution 8 must be at least the model stride 16"),
        ("size-not-a-multiple", lambda w: ["features", CAT1, "--model", m(w), "-o", o(w), *SMALL[:6], "--size", "17x17"],
         r"--size \(17, 17\) must be positive multiples of the model stride 16"),
        ("size-malformed", lambda w: feats(w, "--size", "17by17"), r"--size: '17by17' is not HEIGHTxWIDTH"),
        ("size-and-resolution", lambda w: feats(w, "--size", "64x64"), r"give one of them"),
        ("discard-comma", lambda w: feats(w, "--discard", ","), r"--discard ',': use auto, none, or channel indices"),
        ("discard-words", lambda w: feats(w, "--discard", "big"), r"--discard 'big': use auto, none"),
        ("discard-duplicates", lambda w: feats(w, "--discard", "3,3"), r"duplicates"),
        ("discard-beyond-width", lambda w: feats(w, "--discard", "9999"), r"discard channels \[9999\] are out of range.*0\.\.63"),
        ("massive-ratio-0", lambda w: feats(w, "--massive-ratio", "0"), r"--massive-ratio 0.* greater than 0"),
        ("vae-sample-unknown", lambda w: feats(w, "--vae-sample", "twice"), r"argument --vae-sample: invalid choice"),
        ("dtype-spelling", lambda w: feats(w, "--dtype", "float32"), r"argument --dtype: invalid choice"),
        ("guidance-inf", lambda w: feats(w, "--guidance", "inf"), r"--guidance inf must be a finite number"),
        ("seed-negative", lambda w: feats(w, "--seed", "-1"), r"--seed -1 must be at least 0"),
        ("variant-unknown", lambda w: feats(w, "--variant", "best"), r"argument --variant: invalid choice"),
        # ---- features: devices, models, images, outputs
        ("device-cuda-on-cpu", lambda w: feats(w, "--device", "cuda"), r"--device 'cuda': this torch is a CPU build"),
        ("device-malformed", lambda w: feats(w, "--device", "gpu0"), r"--device 'gpu0' is not a device; use cpu, cuda"),
        ("alias-typo", lambda w: ["features", CAT1, "--model", "flux-devv", "-o", o(w)], r"Did you mean 'flux-dev'"),
        ("model-missing-path", lambda w: ["features", CAT1, "--model", "./nowhere/model", "-o", o(w), *SMALL],
         r"'./nowhere/model': no such file or folder"),
        ("model-no-vae", lambda w: ["features", CAT1, "--model", str(w.broken["no_vae"]), "-o", o(w), *SMALL],
         r"the vae folder .* is missing or empty, but model_index.json lists it"),
        ("model-no-text-encoder", lambda w: ["features", CAT1, "--model", str(w.broken["no_text_encoder_2"]), "-o", o(w), *SMALL],
         r"the text_encoder_2 folder .* is missing or empty, but model_index.json lists it"),
        ("model-no-tokenizer", lambda w: ["features", CAT1, "--model", str(w.broken["no_tokenizer_2"]), "-o", o(w), *SMALL],
         r"the tokenizer_2 folder .* is missing or empty"),
        ("model-truncated-weights", lambda w: ["features", CAT1, "--model", str(w.broken["truncated"]), "-o", o(w), *SMALL],
         r"diffusion_pytorch_model.safetensors is truncated"),
        ("model-broken-header", lambda w: ["features", CAT1, "--model", str(w.broken["bad_header"]), "-o", o(w), *SMALL],
         r"is not a readable safetensors file \(its header is broken\)"),
        ("model-empty-index", lambda w: ["features", CAT1, "--model", str(w.broken["empty_index"]), "-o", o(w), *SMALL],
         r"model_index.json is empty"),
        ("model-bad-config", lambda w: ["features", CAT1, "--model", str(w.broken["bad_config"]), "-o", o(w), *SMALL],
         r"config.json is not valid JSON"),
        ("model-no-weights", lambda w: ["features", CAT1, "--model", str(w.broken["no_weights"]), "-o", o(w), *SMALL],
         r"has no diffusion_pytorch_model.safetensors"),
        ("weights-variant-missing", lambda w: feats(w, "--weights-variant", "bf16"), r"no diffusion_pytorch_model.bf16.safetensors"),
        ("bare-transformer-for-images", lambda w: ["features", CAT1, "--model", str(w.model / "transformer"), "-o", o(w), *SMALL],
         r"is a bare transformer folder, but this run needs vae"),
        ("image-missing", lambda w: ["features", "missing.jpg", "--model", m(w), "-o", o(w), *SMALL], r"'missing.jpg' does not exist"),
        ("image-not-an-image", lambda w: ["features", str(w.files["not_an_image"]), "--model", m(w), "-o", o(w), *SMALL],
         r"notes.jpg' is corrupt or not an image"),
        ("image-over-the-pixel-limit", lambda w: ["features", str(w.files["huge"]), "--model", m(w), "-o", o(w), *SMALL,
                                                  "--max-pixels", "10000"], r"huge.png' is 200x150 = 0 megapixels, larger than the limit.*--max-pixels"),
        ("max-pixels-0", lambda w: feats(w, "--max-pixels", "0"), r"--max-pixels 0 must be at least 1"),
        ("output-is-a-file", lambda w: ["features", CAT1, "--model", m(w), "-o", str(w.files["a_file"]), *SMALL],
         r"--output .*a_file.txt' is a file, but this command writes a folder"),
        ("output-below-a-file", lambda w: ["features", CAT1, "--model", m(w), "-o", str(w.files["a_file"] / "sub"), *SMALL],
         r"a_file.txt is a file, so nothing can be written below it"),
        ("local-model-without-preset", lambda w: ["features", CAT1, "--model", m(w), "-o", o(w), "--device", "cpu"],
         r"block, t, ensemble are required: model .* has no preset.*--block, --t, --ensemble"),
        # ---- match
        ("points-outside", lambda w: match(w, "-o", o(w, "m.png"), "--points", "9999,5"), r"--points \[\[9999, 5\]\] lie outside the 500x375"),
        ("points-malformed", lambda w: match(w, "-o", o(w, "m.png"), "--points", "abc"), r"--points 'abc' is not 'x,y;x,y"),
        ("match-figure-suffix", lambda w: match(w, "-o", o(w, "m.txt")), r"--output .*m.txt': the suffix '.txt' is not one of .png"),
        ("match-target-missing", lambda w: ["match", CAT1, "nowhere.jpg", "--points", "1,1", "--model", m(w), "-o", o(w, "m.png"), *SMALL],
         r"'nowhere.jpg' does not exist"),
        # ---- eval spair / pfpascal / ap10k
        ("eval-no-source", lambda w: spair(), r"pass exactly one of --features DIR"),
        ("eval-two-sources", lambda w: spair("--features", str(SPAIR / "features"), "--model", m(w)), r"got --features, --model"),
        ("eval-features-with-settings", lambda w: spair("--features", str(SPAIR / "features"), "--variant", "raw"),
         r"error: --variant describe how features are extracted, but --features reads precomputed maps"),
        ("eval-features-with-t", lambda w: spair("--features", str(SPAIR / "features"), "--t", "100"), r"--t describe how features"),
        ("eval-baseline-with-variant", lambda w: spair("--baseline", "dinov2-b14", "--variant", "raw"),
         r"error: --variant set DiTF features, but --baseline dinov2-b14 has its own published settings"),
        ("eval-root-missing", lambda w: ["eval", "spair", "--root", str(w.out / "nowhere"), "--features", str(SPAIR / "features")],
         r"SPair-71k root .*nowhere is not a directory.*SPair-71k.tar.gz"),
        ("eval-output-is-a-folder", lambda w: spair("--features", str(SPAIR / "features"), "--output", str(w.files["read_only"])),
         r"--output .*read_only' is a folder; pass a file path"),
        ("eval-output-suffix", lambda w: spair("--features", str(SPAIR / "features"), "--output", o(w, "r.txt")), r"the suffix '.txt' is not one of .json"),
        ("eval-plot-without-output", lambda w: spair("--features", str(SPAIR / "features"), "--plot"), r"--plot writes figures next to the results file"),
        ("eval-shard-malformed", lambda w: spair("--model", m(w), *SMALL, "--shard", "3/3"), r"shard must be i/n with 0 <= i < n"),
        ("eval-shard-with-features", lambda w: spair("--features", str(SPAIR / "features"), "--shard", "0/2"), r"--shard describe how features"),
        ("eval-workers-0", lambda w: spair("--features", str(SPAIR / "features"), "--workers", "0"), r"--workers 0: give at least 1"),
        ("eval-caption-without-captions", lambda w: spair("--model", m(w), *SMALL, "--prompt-mode", "caption"),
         r"prompt mode 'caption' needs captions"),
        ("eval-captions-broken", lambda w: spair("--model", m(w), *SMALL, "--prompt-mode", "caption", "--captions", str(w.files["captions_broken"])),
         r"captions.json is not valid JSON"),
        ("eval-pad-size-0", lambda w: spair("--features", str(SPAIR / "features"), "--protocol", "geoaware", "--pad-size", "0"),
         r"pad size must be a positive number of pixels"),
        ("eval-unknown-category", lambda w: spair("--features", str(SPAIR / "features"), "--categories", "cow"), r"available: \['aeroplane'\]"),
        ("eval-filter-malformed", lambda w: spair("--features", str(SPAIR / "features"), "--filter", "truncation"), r"FLAG=VALUE"),
        ("eval-allow-unknown", lambda w: spair("--features", str(SPAIR / "features"), "--allow", "everything"), r"--allow \['everything'\]: the checks"),
        ("eval-nan-features", lambda w: spair("--features", str(w.files["features_nan"])), r"2008_004100.safetensors: 1 feature values are NaN"),
        ("eval-constant-features", lambda w: spair("--features", str(w.files["features_constant"])),
         r"2008_004100.safetensors: the feature map is constant.*--allow constant"),
        ("eval-transposed-features", lambda w: spair("--features", str(w.files["features_transposed"])),
         r"2008_004100.safetensors: the feature map is 40x27 .* transposed.*--allow aspect"),
        ("eval-cache-dtype-spelling", lambda w: spair("--model", m(w), "--cache-dtype", "float16"), r"argument --cache-dtype: invalid choice"),
        ("eval-pfpascal-missing", lambda w: ["eval", "pfpascal", "--root", str(w.out / "none"), "--features", str(SPAIR)],
         r"PF-Pascal root .* is not a directory"),
        ("eval-ap10k-missing", lambda w: ["eval", "ap10k", "--root", str(w.out / "none"), "--features", str(SPAIR)], r"AP-10K"),
        ("eval-channels-differ", lambda w: spair("--features", str(w.files["features_narrow"])),
         r"2008_004100.safetensors\) have 16 channels but those of .*2008_002719.safetensors\) have 48"),
        # ---- eval --fuse
        ("fuse-params-without-fuse", lambda w: spair("--features", str(SPAIR / "features"), "--fuse-dims", "8", "none"),
         r"--fuse-dims only apply together with --fuse"),
        ("fuse-dims-0", lambda w: spair("--features", str(SPAIR / "features"), "--fuse", "dinov2-b14", "--fuse-dims", "0", "none"),
         r"argument --fuse-dims: '0' is not a number of dimensions >= 1 or 'none'"),
        ("fuse-weights-zero", lambda w: spair("--features", str(SPAIR / "features"), "--fuse-features", str(SPAIR / "features"),
                                              "--fuse-weights", "0", "0"), r"fusion weights=\(0.0, 0.0\) .* not both 0"),
        ("fuse-dims-above-channels", lambda w: spair("--features", str(SPAIR / "features"), "--fuse-features", str(SPAIR / "features")),
         r"fusion dims \[512, None\]: the DiTF maps have 48 channels .*--fuse-dims 48 none"),
        ("fuse-unknown", lambda w: spair("--features", str(SPAIR / "features"), "--fuse", "dinov3"), r"argument --fuse: invalid choice"),
        ("fuse-both-sources", lambda w: spair("--features", str(SPAIR / "features"), "--fuse", "dinov2-b14", "--fuse-features", str(SPAIR)),
         r"pass one of --fuse NAME .* and --fuse-features DIR"),
        ("fuse-features-missing", lambda w: spair("--features", str(SPAIR / "features"), "--fuse-features", o(w, "none")),
         r"features folder .*none does not exist"),
        ("fuse-channels-differ", lambda w: spair("--features", str(SPAIR / "features"), "--fuse-features", str(w.files["features_narrow"]),
                                                 "--fuse-dims", "8", "none"), r"2008_004100.safetensors\) have 16 channels"),
        # ---- HPatches
        ("hpatches-root-missing", lambda w: ["eval", "hpatches", "--root", o(w, "nowhere"), "--features", str(HP_FEATURES), "--keypoints", "sift"],
         r"HPatches root .*nowhere is not a directory.*hpatches-sequences-release.tar.gz"),
        ("hpatches-partial-tree", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", "sift", root="hpatches_partial"),
         r"lacks i_case21_0/H_1_4 .*the download is incomplete"),
        ("hpatches-keypoints-wrong-shape", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", str(w.files["kp_3col"])),
         r"keypoint file .*i_case21_0-1.kp has 3 columns per row .*expected 2"),
        ("hpatches-keypoints-outside", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", str(w.files["kp_outside"])),
         r"keypoint file .*i_case21_0-1.kp has 1 keypoints outside its 240x180 image"),
        ("hpatches-keypoints-missing", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", o(w, "kps")),
         r"keypoint folder .*kps does not exist.*superpoint-1k"),
        ("hpatches-channels-differ", lambda w: hp(w, "--features", str(w.files["hp_features_narrow"]), "--keypoints", "grid"),
         r"v_case21_1/3.safetensors\) have 16 channels but those of .*/1.safetensors\) have 32"),
        ("hpatches-features-missing", lambda w: hp(w, "--features", str(w.files["empty"]), "--keypoints", "grid"),
         r"24 of 24 images have no features .*<sequence>/<image stem>.safetensors"),
        ("hpatches-no-source", lambda w: hp(w, "--keypoints", "grid"), r"pass exactly one of --features DIR"),
        ("hpatches-mode", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", "grid", "--mode", "magsac"),
         r"argument --mode: invalid choice"),
        ("hpatches-output-suffix", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", "grid", "-o", o(w, "h.txt")),
         r"the suffix '.txt' is not one of .json"),
        ("hpatches-plot-suffix", lambda w: hp(w, "--features", str(HP_FEATURES), "--keypoints", "grid", "--plot", o(w, "p.json")),
         r"--plot .*p.json': the suffix '.json' is not one of .png"),
        # ---- ADE20K
        ("ade20k-root-missing", lambda w: ["eval", "ade20k", "--root", o(w, "nowhere"), "--features", str(SPAIR), "-o", o(w)],
         r"ADE20K root .*nowhere does not exist.*ADEChallengeData2016.zip"),
        ("ade20k-no-training-split", lambda w: ["eval", "ade20k", "--root", str(ADE), "--features", str(SPAIR), "-o", o(w)],
         r"the ADE20K training annotations are missing: folder .*annotations/training does not exist"),
        ("ade20k-image-without-annotation", lambda w: ade(w, "--features", str(SPAIR), "--train-split", "validation"),
         r"the ADE20K tree is incomplete: 1 image\(s\) have no partner .*ADE_val_04100003.png"),
        ("ade20k-features-missing", lambda w: ["eval", "ade20k", "--root", str(ADE), "--features", str(w.files["empty"]),
                                               "--train-split", "validation", "-o", o(w), "--quiet"],
         r"6 of 6 images have no features .*<split>/<image stem>.safetensors"),
        ("ade20k-output-is-a-file", lambda w: ["eval", "ade20k", "--root", str(ADE), "--features", str(SPAIR), "-o", str(w.files["a_file"])],
         r"--output .*a_file.txt' is a file, but this command writes a folder"),
        ("ade20k-steps-0", lambda w: ade(w, "--features", str(SPAIR), "--steps", "0"), r"--steps 0 must be > 0"),
        ("ade20k-probe-unknown", lambda w: ade(w, "--features", str(SPAIR), "--probe", "deep"), r"argument --probe: invalid choice"),
        # ---- seg-score
        ("seg-score-wrong-size", lambda w: seg("--predictions", str(w.files["pred_wrong_size"])),
         r"prediction .*ADE_val_04100001.png is 12x10 \(WxH\) but its annotation .* write predictions at the annotation's size"),
        ("seg-score-id-above-150", lambda w: seg("--predictions", str(w.files["pred_id_151"])),
         r"prediction .*ADE_val_04100001.png contains id 151; .*ids 1\.\.150 .*add 1"),
        ("seg-score-prediction-missing", lambda w: seg("--predictions", str(w.files["pred_missing"])),
         r"lacks 1 of 6 predictions \(ADE_val_04100001.png\)"),
        ("seg-score-predictions-folder-missing", lambda w: seg("--predictions", o(w, "pred")), r"predictions folder .*pred does not exist"),
        ("seg-score-predictions-a-file", lambda w: seg("--predictions", str(w.files["a_file"])), r"--predictions .*a_file.txt' is a file"),
        ("seg-score-root-missing", lambda w: ["eval", "seg-score", "--root", o(w, "none"), "--predictions", str(ADE / "predictions")],
         r"ADE20K root .*none does not exist"),
        ("seg-score-output-suffix", lambda w: seg("--predictions", str(ADE / "predictions"), "-o", o(w, "s.txt")),
         r"the suffix '.txt' is not one of .json"),
        # ---- DAVIS
        ("davis-score-results-missing", lambda w: ["eval", "davis-score", "--root", str(DAVIS), "--results", o(w, "none")],
         r"results folder .* does not exist"),
        ("davis-score-output-suffix", lambda w: ["eval", "davis-score", "--root", str(DAVIS), "--results", str(DAVIS), "-o", o(w, "s.txt")],
         r"the suffix '.txt' is not one of .json"),
        ("davis-root-missing", lambda w: ["eval", "davis-score", "--root", o(w, "none"), "--results", str(DAVIS)], r"DAVIS"),
        ("davis-short-side-0", lambda w: davis(w, "--t", "90", "--short-side", "0"), r"--short-side 0 and multiple=32 must both be >= 1"),
        ("davis-topk-0", lambda w: davis(w, "--t", "90", "--topk", "0"), r"--topk 0 is invalid; it must be a whole number >= 1"),
        ("davis-radius-negative", lambda w: davis(w, "--t", "90", "--neighborhood-radius", "-1"), r"--neighborhood-radius -1 is invalid"),
        ("davis-temperature-0", lambda w: davis(w, "--t", "90", "--temperature", "0"), r"--temperature 0.0 is invalid"),
        ("davis-n-last-negative", lambda w: davis(w, "--t", "90", "--n-last-frames", "-2"), r"--n-last-frames -2 is invalid"),
        ("davis-local-model-without-t", lambda w: davis(w), r"t is required: model .* has no preset"),
        ("davis-unknown-sequence", lambda w: davis(w, "--t", "90", "--sequences", "nope"), r"sequences \['nope'\] are not in the DAVIS-2017 val list"),
        ("davis-plot-suffix", lambda w: davis(w, "--t", "90", "--plot", o(w, "p.txt")), r"--plot .*p.txt': the suffix"),
        # ---- massive
        ("scan-steps-0", lambda w: scan(w, "--num-inference-steps", "0"), r"--num-inference-steps 0 must be at least 1"),
        ("scan-height-17", lambda w: scan(w, "--height", "17"), r"--height 17 must be a positive multiple of 8"),
        ("scan-height-0", lambda w: scan(w, "--height", "0"), r"--height 0 must be a positive multiple of 8"),
        ("scan-height-not-stride", lambda w: scan(w, "--height", "72"), r"--height 72 must be a multiple of 16 pixels for this model"),
        ("scan-rule", lambda w: scan(w, "--rule", "foo"), r"--rule 'foo'; use ratio\[:T\]"),
        ("scan-output-is-a-file", lambda w: ["massive", "scan", "--model", m(w), "-o", str(w.files["a_file"])], r"is a file, but this command writes a folder"),
        ("scan-image-missing", lambda w: scan(w, "--image", "nowhere.png", "--t", "261"), r"'nowhere.png' does not exist"),
        ("scan-t-without-image", lambda w: scan(w, "--t", "261"), r"--t only apply together with --image"),
        ("scan-bare-transformer", lambda w: ["massive", "scan", "--model", str(w.model / "transformer"), "-o", o(w)], r"bare transformer"),
        ("disrupt-op", lambda w: gen(w, ["disrupt", "--blocks", "0"], "--op", "foo", "-o", o(w, "g.png")), r"--op 'foo' is not an operation"),
        ("disrupt-image-suffix", lambda w: gen(w, ["disrupt", "--blocks", "0"], "-o", o(w, "g.txt")), r"the suffix '.txt' is not one of .png"),
        ("disrupt-channels-out-of-range", lambda w: gen(w, ["disrupt", "--blocks", "0", "--channels", "99"], "-o", o(w, "g.png")),
         r"\[99\] are out of range; valid channel indices are 0\.\.63"),
        ("disrupt-blocks-out-of-range", lambda w: gen(w, ["disrupt", "--blocks", "29"], "-o", o(w, "g.png")), r"--blocks 29 is out of range"),
        ("guide-two-blocks", lambda w: gen(w, ["guide", "--weight", "2", "--blocks", "3,4"], "-o", o(w, "g.png")), r"Detail Guidance disrupts one block m"),
        ("transport-mask", lambda w: gen(w, ["transport", "--source-prompt", "a dog", "--blocks", "0", "--mask", "x"], "-o", o(w, "g.png")),
         r"argument --mask: invalid choice"),
        # ---- smoke model
        ("smoke-model-into-a-file", lambda w: ["smoke-model", "-o", str(w.files["a_file"])], r"exists but holds no smoke model"),
        # ---- pca
        ("pca-image-missing", lambda w: ["pca", "missing.jpg", "--model", m(w), "-o", o(w, "p.png"), *SMALL], r"'missing.jpg' does not exist"),
        ("pca-image-not-an-image", lambda w: ["pca", CAT1, str(w.files["not_an_image"]), "--model", m(w), "-o", o(w, "p.png"), *SMALL],
         r"notes.jpg' is corrupt or not an image"),
        ("pca-figure-suffix", lambda w: ["pca", CAT1, "--model", m(w), "-o", o(w, "p.txt"), *SMALL],
         r"--output .*p.txt': the suffix '.txt' is not one of .png"),
        ("pca-output-below-a-file", lambda w: ["pca", CAT1, "--model", m(w), "-o", str(w.files["a_file"] / "p.png"), *SMALL],
         r"a_file.txt is a file, so nothing can be written below it"),
        ("pca-threshold-without-foreground", lambda w: ["pca", CAT1, "--model", m(w), "-o", o(w, "p.png"), "--threshold", "0.4", *SMALL],
         r"--threshold only apply together with --foreground"),
        ("pca-threshold-out-of-range", lambda w: ["pca", CAT1, "--model", m(w), "-o", o(w, "p.png"), "--foreground", "--threshold", "1.5",
                                                  *SMALL], r"--threshold 1.5 must lie strictly between 0 and 1"),
        ("pca-t-out-of-range", lambda w: ["pca", CAT1, "--model", m(w), "-o", o(w, "p.png"), *SMALL, "--t", "2000"], r"--t 2000.* outside 0\.\.1000"),
        # ---- app (each fails before a server starts)
        ("app-port-too-large", lambda w: ["app", "--port", "70000"], r"--port 70000 is outside 1\.\.65535"),
        ("app-port-0", lambda w: ["app", "--port", "0"], r"--port 0 is outside 1\.\.65535"),
        ("app-port-not-a-number", lambda w: ["app", "--port", "http"], r"argument --port: invalid int value"),
        ("app-max-pixels-0", lambda w: ["app", "--max-pixels", "0"], r"--max-pixels 0 must be at least 1"),
        ("app-model-missing", lambda w: ["app", "--model", "./nowhere/model"], r"'./nowhere/model': no such file or folder"),
        ("app-alias-typo", lambda w: ["app", "--model", "flux-devv"], r"Did you mean 'flux-dev'"),
        ("app-model-no-vae", lambda w: ["app", "--model", str(w.broken["no_vae"]), "--device", "cpu"],
         r"the vae folder .* is missing or empty"),
        ("app-device-malformed", lambda w: ["app", "--model", m(w), "--device", "gpu0"], r"--device 'gpu0' is not a device"),
        ("app-discard", lambda w: ["app", "--model", m(w), "--discard", "auto"], r"unrecognized arguments: --discard auto"),
        ("app-t-out-of-range", lambda w: ["app", "--model", m(w), "--device", "cpu", "--t", "2000"], r"--t 2000.* outside 0\.\.1000"),
        ("app-ensemble-too-large", lambda w: ["app", "--model", m(w), "--device", "cpu", "--ensemble", "100"],
         r"--ensemble 100 is more than the app's 64"),
        ("app-max-batch-0", lambda w: ["app", "--max-batch", "0"], r"--max-batch 0: give at least 1"),
    ]


ROWS = rows()


@pytest.mark.parametrize("argv_of, message", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_gets_one_clear_message_and_no_output(world, capsys, argv_of, message):
    if world.out.exists():
        shutil.rmtree(world.out)
    argv = argv_of(world)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert re.search(message, captured.err), captured.err
    leftovers = [p for p in world.out.rglob("*") if p.is_file()] if world.out.exists() else []
    assert leftovers == [], leftovers


def test_running_out_of_gpu_memory_names_the_flags_that_need_less(world, capsys, monkeypatch):
    import torch

    import ditf.features.featurizer as featurizer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(featurizer.DiTFeaturizer, "extract", out_of_memory)
    code = main(["features", CAT1, "--model", str(world.model), "-o", str(world.out / "oom"), *SMALL])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert re.fullmatch(r"ditf: error: out of memory \(CUDA out of memory\. Tried .*--max-batch 1.*--offload model.*"
                        r"--dtype bf16.*\n", captured.err), captured.err


def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_partial_file(world, capsys, monkeypatch):
    import ditf.features.featurizer as featurizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(featurizer.DiTFeaturizer, "extract", interrupted)
    code = main(["features", CAT1, CAT2, "--model", str(world.model), "-o", str(world.out / "ctrl_c"), *SMALL])
    captured = capsys.readouterr()
    assert code == 130 and captured.err.strip().splitlines()[-1].startswith("ditf: interrupted")
    assert "Traceback" not in captured.err
    assert not (world.out / "ctrl_c").exists() or not any((world.out / "ctrl_c").rglob("*.safetensors"))
