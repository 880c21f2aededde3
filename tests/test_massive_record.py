"""Recording the residual stream during real sampling and in a single forward (tiny FLUX, injected MAs 11 and 42)."""

import functools

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FLUX_TINY, FLUX_TINY_MASSIVE, leftover_hooks
from torch import nn

from ditf.arch import arch_for
from ditf.errors import InvalidArgumentError, UnsupportedLayoutError
from ditf.massive import CfgLayout, RatioRule, Record, Zero, detect_table, intervene

INJECTED = FLUX_TINY_MASSIVE
SAMPLING = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt")


def sample(pipe, prompt="a cat", seed=0, **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**SAMPLING, **extra}).images


@pytest.fixture(scope="module")
def baseline(pipe):
    return sample(pipe)


@pytest.fixture(scope="module")
def recorded(pipe):
    """One 2-step generation watched by three Records at once; returns (output, recordings)."""
    everything = Record(points=("image", "output", "text", "shift", "scale", "gate"), full=("image", "output"))
    last_only = Record(blocks=[3, 20], steps="last")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with intervene(pipe, [everything, last_only]) as session:
        output = sample(pipe)
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return output, everything.recording, last_only.recording, session


def test_recording_does_not_change_the_image_and_leaves_no_hooks(pipe, baseline, recorded):
    output, *_ = recorded
    assert torch.equal(output, baseline)
    assert leftover_hooks(pipe.transformer) == []


def test_ratio_rule_finds_exactly_the_injected_channels_at_every_block_and_step(recorded):
    _, everything, _, _ = recorded
    table = everything.table("image", "cond")
    assert table.blocks == list(range(29)) and table.steps == [0, 1]
    detections = detect_table(table, RatioRule())
    assert all(channels == INJECTED for channels in detections.values())


def test_steps_follow_the_scheduler_and_sequential_cfg_without_negative_prompt_is_cond_only(recorded):
    _, everything, _, session = recorded
    assert everything.timesteps == {0: 1000.0, 1: 500.0}
    assert session.branches_seen == {"cond"} and session.calls == 2


def test_block_output_is_the_next_blocks_input_and_the_last_blocks_is_read_from_what_it_returns(recorded):
    _, everything, _, _ = recorded
    for block in (0, 18, 27):
        assert torch.equal(everything.tensor("output", block, 1), everything.tensor("image", block + 1, 1))
    last = everything.tensor("output", 28, 1)
    assert last.shape == (1, 16, 64) and not torch.equal(last, everything.tensor("image", 28, 1))


def test_adaln_vectors_and_text_stream_are_recorded_per_block(recorded):
    _, everything, _, _ = recorded
    shift, scale, gate = everything.adaln(19, 0)
    assert shift.shape == scale.shape == gate.shape == (64,)
    assert everything.table("text", "cond").blocks == list(range(29))
    assert everything.tensor("gate", 19, 0).shape == (1, 64)


def test_statistics_only_records_keep_no_stream_tensors_and_last_means_the_final_step(recorded):
    _, _, last_only, _ = recorded
    assert last_only.tensors == {}
    table = last_only.table()
    assert table.blocks == [3, 20] and table.steps == [1]


def test_true_cfg_calls_are_told_apart_cond_first(pipe):
    both, uncond = Record(blocks=[0], branch="all", full=True), Record(blocks=[0], branch="uncond")
    with intervene(pipe, [both, uncond]) as session:
        sample(pipe, negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=1)
    assert session.calls == 2 and both.recording.branches == ["cond", "uncond"]
    assert uncond.recording.table(branch="uncond").steps == [0]
    cond_stream, uncond_stream = (both.recording.tensor("image", 0, 0, b) for b in ("cond", "uncond"))
    assert torch.equal(cond_stream, uncond_stream)  # both calls embed the same latents; text differs
    with pytest.raises(InvalidArgumentError, match="branch 'cond'"):
        uncond.recording.table(branch="cond")


@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_batched_cfg_halves_are_told_apart_uncond_first(family, tmp_path):
    """SD3 exposes `do_classifier_free_guidance`; PixArt does not, and is recognised by its duplicated latents."""
    from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline
    from tiny_pixart import build_pixart_pipeline
    from tiny_sd3 import build_sd3_pipeline

    if family == "sd3":
        pipeline = StableDiffusion3Pipeline.from_pretrained(build_sd3_pipeline(tmp_path / family))
        extra = {}
    else:
        pipeline = PixArtSigmaPipeline.from_pretrained(build_pixart_pipeline(tmp_path / family, sigma=True))
        extra = {"use_resolution_binning": False}
    pipeline.set_progress_bar_config(disable=True)

    def cond_and_uncond(guidance_scale):
        record = Record(blocks=[1], steps=[0], branch="all", full=True)
        with intervene(pipeline, [record]):
            pipeline("a cat", num_inference_steps=1, guidance_scale=guidance_scale, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="pt", **extra)
        return record.recording

    with_cfg, without_cfg = cond_and_uncond(4.0), cond_and_uncond(1.0)
    assert with_cfg.branches == ["cond", "uncond"] and without_cfg.branches == ["cond"]
    cond = with_cfg.tensor("image", 1, 0, "cond")
    torch.testing.assert_close(cond, without_cfg.tensor("image", 1, 0, "cond"), rtol=0, atol=1e-5)
    assert (with_cfg.tensor("image", 1, 0, "uncond") - cond).abs().max() > 1e-2


def test_batched_cfg_layout_splits_batch_halves():
    sd3_like = CfgLayout("batched", ("uncond", "cond"))
    assert sd3_like.rows(0, 4, cfg_active=True) == (("uncond", slice(0, 2)), ("cond", slice(2, 4)))
    assert sd3_like.rows(0, 2, cfg_active=False) == (("cond", slice(0, 2)),)
    assert sd3_like.rows(1, 2, cfg_active=True) == (("extra", slice(0, 2)),)
    assert CfgLayout("sequential").rows(1, 1, cfg_active=False) == (("uncond", slice(0, 1)),)


def test_single_noised_forward_reproduces_the_reference_block_inputs():
    """The DiTF authors' code gives the ensemble-mean input of blocks 19, 24, 28 for this case."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer").eval()
    case = load_file(FLUX_TINY / "flux_tiny_case.safetensors")
    arch = arch_for(transformer)
    noisy = arch.noise_latents(case["latents"], case["noise"], 261)
    record = Record(points=("image", "gate"), blocks=[19, 24, 28], full=True)
    with intervene(transformer, [record]) as session, torch.no_grad(), session.at_step(0, t=261, total_steps=1):
        arch.run(noisy, 261, {"prompt_embeds": case["txt"], "pooled_prompt_embeds": case["pooled"]}, 3.5)
    for k in (19, 24, 28):
        raw = record.recording.tensor("image", k, 0).mean(0).T.reshape(64, 8, 8)
        torch.testing.assert_close(raw, case[f"k{k}_raw"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(record.recording.tensor("gate", k, 0)[0], case[f"k{k}_gate"], rtol=1e-5, atol=1e-5)
    assert record.recording.timesteps == {0: 261.0}
    assert leftover_hooks(transformer) == []


def test_a_block_that_does_not_exist_names_the_valid_range(pipe):
    with pytest.raises(InvalidArgumentError, match=r"blocks=29 is out of range .* valid blocks are 0\.\.28"):
        with intervene(pipe, [Record(blocks=[29])]):
            pass
    assert leftover_hooks(pipe.transformer) == []


def test_a_step_that_does_not_exist_is_an_error_not_a_silent_no_op(pipe):
    with pytest.raises(InvalidArgumentError, match=r"steps \[5\] do not exist: this run has 2"):
        with intervene(pipe, [Record(steps=[5])]):
            sample(pipe)
    assert leftover_hooks(pipe.transformer) == []


def test_a_branch_that_never_runs_is_reported(pipe):
    with pytest.raises(InvalidArgumentError, match="never applied.*branches \\['cond'\\]"):
        with intervene(pipe, [Record(blocks=[0], branch="uncond")]):
            sample(pipe, num_inference_steps=1)


def test_bad_points_and_families_without_adapters_are_refused(pipe):
    with pytest.raises(InvalidArgumentError, match="valid hook points"):
        Record(points=("residual",))
    with pytest.raises(UnsupportedLayoutError, match="Linear is not a DiT family ditf supports"):
        with intervene(nn.Linear(2, 2), [Record()]):
            pass

    class HomeMadePipeline:
        transformer = pipe.transformer
        scheduler = pipe.scheduler

    with pytest.raises(InvalidArgumentError, match="HomeMadePipeline lays out classifier-free guidance.*cfg_layout="):
        with intervene(HomeMadePipeline(), [Record(branch="cond")]):
            pass


def test_hooks_are_removed_when_the_body_raises(pipe):
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(pipe, [Record(), Zero(channels=INJECTED)]):
            raise RuntimeError("boom")
    assert leftover_hooks(pipe.transformer) == []


def test_a_block_returning_an_unknown_layout_is_named_when_its_output_is_read(pipe):
    block = pipe.transformer.single_transformer_blocks[9]
    stock = block.forward

    @functools.wraps(stock)
    def image_only(*args, **kwargs):
        return stock(*args, **kwargs)[1]

    block.forward = image_only
    try:
        with pytest.raises(UnsupportedLayoutError, match=r"block 28 \(single_transformer_blocks\.9\) returned a "
                                                         r"tensor \(1, 16, 64\), but the flux adapter expects a tuple "
                                                         r"with the image stream at position 1"):
            with intervene(pipe, [Record(points=("output",), blocks=[28])]):
                sample(pipe, num_inference_steps=1)
    finally:
        del block.forward
    assert leftover_hooks(pipe.transformer) == []
