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


@pytest.mark.parametrize("argv, message", [
    (["guide", "--weight", "2", "--blocks", "10,11"], "Detail Guidance disrupts one block m"),
    (["disrupt", "--blocks", "29"], r"--blocks 29 is out of range .* 0\.\.28"),
    (["disrupt", "--channels", "99", "--blocks", "0"], r"\[99\] are out of range; valid channel indices are 0\.\.63"),
])
def test_interventions_refuse_bad_options_with_a_clear_message(flux_pipeline_dir, tmp_path, capsys, argv, message):
    code = main(["massive", *argv, "--model", str(flux_pipeline_dir), "--prompt", "a corgi",
                 "--num-inference-steps", "1", *SMALL, "-o", str(tmp_path / "x.png")])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_scan_needs_a_full_pipeline_and_t_only_with_an_image(flux_pipeline_dir, tmp_path, capsys):
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir / "transformer"), "--prompt", "a", "-o", str(tmp_path)])
    assert code == 2 and "is a bare transformer" in capsys.readouterr().err
    code = main(["massive", "scan", "--model", str(flux_pipeline_dir), "--t", "261", "-o", str(tmp_path)])
    assert code == 2 and "--t only apply together with --image" in capsys.readouterr().err
