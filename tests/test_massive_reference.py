"""Detected channels and their controls come from a clean reference pass, so they edit the same block calls
(tiny FLUX and SD3 pipelines); `--op mean` takes means measured across inputs from a scan."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from PIL import Image
from tiny_models import FLUX_TINY_MASSIVE
from tiny_sd3 import build_sd3_pipeline

from ditf.cli import main
from ditf.massive import Zero
from ditf.massive.generate import generate, save_generation

SMALL = ["--height", "64", "--width", "64", "--num-inference-steps", "2", "--seed", "0"]
CONTROLS = ["auto", "bottom", "random", "matched"]


def disrupted(pipe, channels: str, **call):
    return generate(pipe, "a corgi", actions=[Zero(channels=channels, blocks="all")], num_inference_steps=2,
                    height=64, width=64, progress=False, **call)


def test_auto_and_its_controls_edit_the_same_calls_with_disjoint_equally_sized_sets(pipe):
    results = {channels: disrupted(pipe, channels, max_sequence_length=8) for channels in CONTROLS}
    counts = {name: (r.record["interventions"][0]["applied"], r.record["interventions"][0]["edited"])
              for name, r in results.items()}
    assert counts == dict.fromkeys(CONTROLS, (29 * 2, 29 * 2))  # every block, both steps: auto included
    auto_log = results["auto"].record["interventions"][0]["log"]
    assert {tuple(entry["channels"]) for entry in auto_log} == {tuple(FLUX_TINY_MASSIVE)}
    for name in CONTROLS[1:]:
        for mine, theirs in zip(results[name].record["interventions"][0]["log"], auto_log):
            assert (mine["block"], mine["step"]) == (theirs["block"], theirs["step"])
            assert len(mine["channels"]) == 2 and not set(mine["channels"]) & set(FLUX_TINY_MASSIVE)
    assert results["auto"].record["reference_pass"]["blocks"] == list(range(29))
    assert results["auto"].reference_image.size == (64, 64)


def test_with_cfg_both_branches_are_edited_equally(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    sd3 = StableDiffusion3Pipeline.from_pretrained(partial(build_sd3_pipeline, massive_channels=(3, 7))(tmp_path / "sd3"))
    counts = {}
    for channels in ("auto", "bottom"):
        (edit,) = disrupted(sd3, channels, guidance_scale=5.0).record["interventions"]
        counts[channels] = (edit["applied"], edit["edited"], sorted({e["branch"] for e in edit["log"]}))
    assert counts == dict.fromkeys(("auto", "bottom"), (3 * 2 * 2, 3 * 2 * 2, ["cond", "uncond"]))


def test_the_disrupt_command_records_its_counts_and_the_clean_reference_image(flux_pipeline_dir, tmp_path, capsys):
    for channels in ("auto", "bottom"):
        target = tmp_path / f"{channels}.png"
        code = main(["massive", "disrupt", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", *SMALL,
                     "--channels", channels, "--blocks", "all", "-o", str(target)])
        assert code == 0, capsys.readouterr().err
        record = json.loads(target.with_suffix(".json").read_text())
        (edit,) = record["interventions"]
        assert (edit["applied"], edit["edited"]) == (58, 58)
        assert record["reference_pass"]["image"] == f"{channels}.reference.png"
        assert Image.open(tmp_path / f"{channels}.reference.png").size == (64, 64)
        assert f"![reference]({channels}.reference.png)" in target.with_suffix(".md").read_text()


def test_op_mean_takes_the_means_of_a_scan(flux_pipeline_dir, tmp_path, capsys):
    scans = []
    for prompt in ("a dog", "a tree"):
        scans.append(tmp_path / prompt.replace(" ", "_"))
        assert main(["massive", "scan", "--model", str(flux_pipeline_dir), "--prompt", prompt, *SMALL,
                     "--plot-blocks", "28", "-o", str(scans[-1])]) == 0, capsys.readouterr().err
    target = tmp_path / "mean.png"
    code = main(["massive", "disrupt", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", *SMALL,
                 "--channels", "11,42", "--blocks", "5-9", "--op", "mean", "--mean-from", str(scans[0]),
                 "--mean-from", str(scans[1] / "stats.json"), "-o", str(target)])
    assert code == 0, capsys.readouterr().err
    (edit,) = json.loads(target.with_suffix(".json").read_text())["interventions"]
    assert edit["op"] == "mean" and edit["means"]["table"]["prompt"] == ["a dog", "a tree"] and edit["edited"] == 5 * 2


@pytest.mark.parametrize("argv, message", [
    (["--op", "mean"], r"op 'mean' sets channels to their mean measured across inputs.*--mean-from"),
    (["--op", "zero", "--mean-from", "somewhere"], r"--mean-from only applies to --op mean"),
    (["--channels", "preset"], r"--channels preset: ditf knows no massive channels for --model"),
])
def test_mean_and_preset_channels_are_checked_before_the_model_loads(flux_pipeline_dir, tmp_path, capsys, argv,
                                                                     message, monkeypatch):
    monkeypatch.setattr("ditf.loading.load_components", _must_not_load)
    code = main(["massive", "disrupt", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", *SMALL,
                 "--blocks", "0", *argv, "-o", str(tmp_path / "x.png")])
    assert code == 2 and torch is not None
    assert __import__("re").search(message, capsys.readouterr().err)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def test_a_saved_generation_links_its_image(pipe, tmp_path):
    result = disrupted(pipe, "11,42", max_sequence_length=8)
    paths = save_generation(result, tmp_path / "g.png")
    record = json.loads(paths["record"].read_text())
    assert record["image"] == "g.png" and "reference_pass" not in record  # fixed channels need no clean pass
