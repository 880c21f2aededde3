"""`ditf massive scan | disrupt | guide | transport` end to end on a saved tiny FluxPipeline folder (2 steps, 64x64)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from ditf.cli import main

SMALL = ["--height", "64", "--width", "64", "--seed", "0"]


def test_scan_of_a_generation_writes_report_statistics_and_figures(flux_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "ma_report"
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), "--prompt", "a corgi on a beach", "--num-inference-steps", "2",
                 *SMALL, "--plot-blocks", "28", "--rule", "ratio", "--rule", "topk:2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "massive_report.json").read_text())
    ratio = report["detections"]["ratio(threshold=100.0)"]
    assert len(ratio) == 29 * 2 and all(cell["channels"] == [11, 42] for cell in ratio)
    assert report["meta"]["mode"] == "generation" and report["timesteps"] == {"0": 1000.0, "1": 500.0}
    assert report["alignment"]["cells"][0]["ma_channels"] == [11, 42]
    markdown = (out / "massive_report.md").read_text()
    assert "| 28 | 11, 42 | 11, 42 |" in markdown and "](figures/cluster_masks_step1.png)" in markdown
    for name in ("surface_block28_step1", "channel_maps_block28_step1", "gate_alignment_block28_step1",
                 "cluster_masks_step1", "depth_profile_step1", "step_profile_block28"):
        assert Image.open(out / "figures" / f"{name}.png").size[0] > 300 and (out / "figures" / f"{name}.pdf").is_file()
    assert Image.open(out / "image.png").size == (64, 64)
    assert json.loads((out / "stats.json").read_text())["format"] == "ditf.massive.StatsTable"
    assert (out / "stats.safetensors").is_file()


def test_a_scan_report_holds_what_reproduces_it(flux_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "ma_report"
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", "--num-inference-steps",
                 "2", *SMALL, "--blocks", "20-28", "--plot-blocks", "28", "--rule", "ratio:50", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "massive_report.json").read_text())
    meta = report["meta"]
    assert meta["model"] == str(flux_pipeline_dir) and meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert set(meta["versions"]) >= {"ditf", "torch", "diffusers"} and meta["pipeline"] == "FluxPipeline"
    assert meta["guidance"]["guidance_arguments"] == {"guidance_scale": 3.5, "true_cfg_scale": 1.0}
    assert meta["guidance"]["cfg_scale"] is None and meta["guidance"]["unconditional_branch"] is False
    assert report["rules"] == {"ratio(threshold=50.0)": {"rule": "ratio", "threshold": 50.0}}
    assert report["image"] == "image.png" and "figures/cluster_masks_step1.pdf" in report["figures"]
    strongest = report["top_channels"][-1]["channels"]
    assert {row["channel"]: row["mean"] > 0 for row in strongest[:2]} == {11: True, 42: False}  # signed mean
    markdown = (out / "massive_report.md").read_text()
    assert "![generated image](image.png)" in markdown and "`ratio(threshold=50.0)`: threshold: 50" in markdown
    assert "| mean (signed) |" in markdown and "| dtype | float32 |" in markdown
    for figure in report["figures"]:
        assert (out / figure).is_file() and (figure.endswith(".pdf") or f"]({figure})" in markdown)


def test_a_pixart_scan_takes_pipeline_options(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pixart"
    code = main(["massive", "scan", "--model", str(tiny_pipeline_dir("pixart-sigma")), "--prompt", "a corgi",
                 "--num-inference-steps", "2", *SMALL, "--pipeline-option", "use_resolution_binning=false",
                 "--pipeline-option", "clean_caption=false", "--plot-blocks", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "massive_report.json").read_text())["meta"]
    assert meta["pipeline_options"] == {"use_resolution_binning": False, "clean_caption": False}
    assert meta["guidance"]["cfg_scale"] == 4.5 and meta["pipeline"] == "PixArtSigmaPipeline"


def test_scan_of_one_noised_image(flux_pipeline_dir, tmp_path, capsys):
    picture = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((80, 64, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "image_report"
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), "--image", str(picture), "--t", "261",
                 "--resolution", "64", "--blocks", "19-28", "--plot-blocks", "19", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "massive_report.json").read_text())
    assert report["meta"]["mode"] == "image" and report["meta"]["t"] == 261.0 and report["steps"] == [0]
    assert report["blocks"] == list(range(19, 29))
    assert all(cell["channels"] == [11, 42] for cell in report["detections"]["ratio(threshold=100.0)"])
    assert (out / "figures" / "cluster_masks_step0.png").is_file()


def test_interventions_combine_in_python_and_every_one_is_recorded(pipe):
    from ditf.massive import DetailGuidance, Edit, ZeroOp
    from ditf.massive.generate import TransportPlan, generate

    result = generate(pipe, "a corgi", actions=[Edit(ZeroOp(), [11, 42], blocks="0-3"), DetailGuidance(10, 2.0)],
                      transport=TransportPlan("a tiger", blocks="5-20"), num_inference_steps=2, height=64, width=64,
                      progress=False)
    assert result.image.size == (64, 64) and result.record["transport_source"]["prompt"] == "a tiger"
    edit, guidance, transport = result.record["interventions"]
    assert edit["channels"] == {"selector": "explicit", "channels": [11, 42]} and edit["blocks"] == "0-3"
    assert {(e["block"], e["step"], e["branch"]) for e in edit["log"]} == {
        (b, s, branch) for b in range(4) for s in (0, 1) for branch in ("cond", "detail")}
    assert guidance["action"] == "DetailGuidance" and [e["step"] for e in guidance["log"]] == [0, 1]
    assert transport["action"] == "Transport" and transport["blocks"] == "5-20" and transport["applied"] == 16 * 2 * 2


@pytest.mark.parametrize("command", [
    ["disrupt", "--channels", "11,42", "--blocks", "0-3"],
    ["guide", "--weight", "2.0", "--blocks", "10"],
    ["transport", "--source-prompt", "a tiger", "--blocks", "5-20"],
])
def test_each_intervention_command_writes_the_image_and_its_record(flux_pipeline_dir, tmp_path, capsys, command):
    target = tmp_path / "out.png"
    code = main(["massive", *command, "--model", str(flux_pipeline_dir), "--prompt", "a corgi",
                 "--num-inference-steps", "2", *SMALL, "-o", str(target)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(target).size == (64, 64)
    (action,) = json.loads(target.with_suffix(".json").read_text())["interventions"]
    assert action["action"] == {"disrupt": "Edit", "guide": "DetailGuidance", "transport": "Transport"}[command[0]]


def test_auto_disruption_everywhere(flux_pipeline_dir, tmp_path, capsys):
    target = tmp_path / "broken.png"
    code = main(["massive", "disrupt", "--model", str(flux_pipeline_dir), "--prompt", "a corgi",
                 "--num-inference-steps", "2", *SMALL, "--channels", "auto", "--blocks", "all", "--op", "scale:0.5",
                 "-o", str(target)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(target.with_suffix(".json").read_text())
    (edit,) = record["interventions"]
    assert edit["op"] == "scale" and edit["rho"] == 0.5 and edit["applied"] == 29 * 2
    assert Image.open(target).mode == "RGB"


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("argv, message", [
    (["guide", "--weight", "2", "--blocks", "10,11"], "Detail Guidance disrupts one block m"),
    (["disrupt", "--blocks", "29"], r"--blocks 29 is out of range .* 0\.\.28"),
    (["disrupt", "--channels", "99", "--blocks", "0"], r"\[99\] are out of range; valid channel indices are 0\.\.63"),
    (["disrupt", "--blocks", "0", "--branch", "uncond"],
     r"--branch 'uncond': FluxPipeline has no unconditional branch here: .* only when true_cfg_scale > 1 and a "
     r"negative_prompt or negative_prompt_embeds \(true_cfg_scale=1\.0\); pass true_cfg_scale > 1"),
    (["disrupt", "--blocks", "0", "--steps", "5"], r"steps \[5\] do not exist: this run has 1 denoising steps"),
    (["disrupt", "--blocks", "0", "--pipeline-option", "bogus=1"], r"--pipeline-option 'bogus' is not an argument of "
                                                                   r"FluxPipeline; it takes .*true_cfg_scale"),
    (["disrupt", "--blocks", "0", "--pipeline-option", "height=32"], r"height has its own flag; use --height"),
    (["disrupt", "--blocks", "0", "--pipeline-option", "nokey"], r"write KEY=VALUE"),
    (["transport", "--source-prompt", "a dog", "--blocks", "0", "--source-store", "s.bin"], r"the suffix '\.bin'"),
])
def test_interventions_refuse_bad_options_before_the_model_loads(flux_pipeline_dir, tmp_path, capsys, argv, message,
                                                                  monkeypatch):
    monkeypatch.setattr("ditf.loading.load_components", _must_not_load)
    code = main(["massive", *argv, "--model", str(flux_pipeline_dir), "--prompt", "a corgi",
                 "--num-inference-steps", "1", *SMALL, "-o", str(tmp_path / "x.png")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--branch", "uncond"], r"--branch 'uncond': FluxPipeline has no unconditional branch here"),
    (["--rule", "topk:2:loud"], r"--rule 'topk:2:loud': 'loud' is not a statistic"),
    (["--plot-blocks", "40"], r"--blocks 40 is out of range"),
    (["--image", "cat.png", "--t", "261", "--branch", "uncond"], r"--branch uncond: an --image scan runs one "
                                                                  r"conditional forward"),
])
def test_scan_refuses_bad_options_before_the_model_loads(flux_pipeline_dir, tmp_path, capsys, argv, message,
                                                         monkeypatch):
    monkeypatch.setattr("ditf.loading.load_components", _must_not_load)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save("cat.png")
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), *SMALL, *argv, "-o", str(tmp_path / "out")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_unconditional_branch_is_edited_when_the_call_runs_one(flux_pipeline_dir, tmp_path, capsys):
    target = tmp_path / "uncond.png"
    code = main(["massive", "disrupt", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", "--num-inference-steps",
                 "2", *SMALL, "--channels", "11,42", "--blocks", "3", "--branch", "uncond",
                 "--pipeline-option", "true_cfg_scale=2", "--pipeline-option", "negative_prompt=blurry",
                 "-o", str(target)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(target.with_suffix(".json").read_text())
    assert {(e["step"], e["branch"]) for e in record["interventions"][0]["log"]} == {(0, "uncond"), (1, "uncond")}
    assert record["settings"]["negative_prompt"] == "blurry" and record["guidance"]["cfg_scale"] == 2.0


def test_scan_needs_a_full_pipeline_and_t_only_with_an_image(flux_pipeline_dir, tmp_path, capsys):
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir / "transformer"), "--prompt", "a", "-o", str(tmp_path)])
    assert code == 2 and "is a bare transformer" in capsys.readouterr().err
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), "--t", "261", "-o", str(tmp_path)])
    assert code == 2 and "--t only apply together with --image" in capsys.readouterr().err


def test_transport_keeps_its_source_on_disk_on_request(flux_pipeline_dir, tmp_path, capsys):
    target, store = tmp_path / "moved.png", tmp_path / "source.safetensors"
    code = main(["massive", "transport", "--model", str(flux_pipeline_dir), "--prompt", "a corgi", "--source-prompt",
                 "a tiger", "--num-inference-steps", "2", *SMALL, "--blocks", "5-20", "--mask", "cluster",
                 "--source-store", str(store), "-o", str(target)])
    assert code == 0, capsys.readouterr().err
    source = json.loads(target.with_suffix(".json").read_text())["transport_source"]
    assert source["file"] == str(store) and source["bytes"] == store.stat().st_size and source["complete"] is False
    (transport,) = json.loads(target.with_suffix(".json").read_text())["interventions"]
    assert transport["spatial"] == "cluster" and transport["signed_clustering"] is False and transport["applied"] == 32
