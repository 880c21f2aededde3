"""Edits, Detail Guidance and activation transport during real sampling (tiny FLUX, injected MAs 11 and 42)."""

import numpy as np
import pytest
import torch
from tiny_models import FLUX_TINY_MASSIVE, leftover_hooks

from ditf.errors import InvalidArgumentError
from ditf.massive import (
    Clamp,
    ControlChannels,
    DetailGuidance,
    DetectedChannels,
    ExplicitChannels,
    MeanOp,
    Record,
    Scale,
    ScaleOp,
    SetMean,
    StatsTable,
    Transport,
    TransportSource,
    Where,
    Zero,
    intervene,
    parse_channels,
    parse_op,
    prompt_interpolation,
    record_image_trajectory,
    record_reference,
    record_trajectory,
    subject_driven,
)

INJECTED = FLUX_TINY_MASSIVE
SAMPLING = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt")


def sample(pipe, prompt="a cat", **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**SAMPLING, **extra}).images


def sample_with(pipe, actions, prompt="a cat"):
    with intervene(pipe, actions) as session:
        images = sample(pipe, prompt)
    return images, session


@pytest.fixture(scope="module")
def baseline(pipe):
    return sample(pipe)


# ------------------------------------------------------------------------------ identities and effects


def test_scaling_every_channel_by_one_reproduces_the_image_bit_for_bit(pipe, baseline):
    images, session = sample_with(pipe, [Scale(1.0, channels="all")])
    assert torch.equal(images, baseline)
    assert session.actions[0].applied == 29 * 2


def test_an_empty_token_mask_changes_nothing(pipe, baseline):
    nothing = torch.zeros(4, 4, dtype=torch.bool)
    images, session = sample_with(pipe, [Zero(channels=INJECTED, tokens=nothing)])
    assert torch.equal(images, baseline)
    assert all(entry["tokens"] == 0 for entry in session.actions[0].log)


def test_zeroing_the_injected_channels_changes_the_image(pipe, baseline):
    images, session = sample_with(pipe, [Zero(channels=INJECTED, blocks="0-18")])
    assert (images - baseline).abs().max() > 0.05
    assert {tuple(entry["channels"]) for entry in session.actions[0].log} == {(11, 42)}
    assert leftover_hooks(pipe.transformer) == []


def test_auto_channels_come_from_a_clean_reference_pass_so_every_scoped_block_is_edited(pipe):
    _, reference = record_reference(pipe, "a cat", blocks=[0, 1], **SAMPLING)
    _, session = sample_with(pipe, [Zero(channels="auto", blocks=[0, 1], steps=[1], reference=reference)])
    found = {entry["block"]: entry["channels"] for entry in session.actions[0].log}
    assert found == {0: INJECTED, 1: INJECTED} and session.actions[0].edited == 2


def test_detecting_on_the_edited_stream_is_only_on_request_and_finds_nothing_below_the_first_edit(pipe):
    with pytest.raises(InvalidArgumentError, match="picks its channels from the unmodified stream, so it needs reference="):
        sample_with(pipe, [Zero(channels="auto", blocks=[0, 1])])
    _, session = sample_with(pipe, [Zero(channels="auto", blocks=[0, 1], steps=[1], reference="live")])
    found = {entry["block"]: entry["channels"] for entry in session.actions[0].log}
    assert found == {0: INJECTED, 1: []}  # zeroed at block 0, so block 1 has no massive channel left


def test_edits_apply_in_list_order_and_rho_can_follow_t(pipe):
    seen_t = []

    def rho(t):
        seen_t.append(t)
        return 1.0

    record = Record(blocks=[5], full=True, steps=[0])
    _, _ = sample_with(pipe, [Zero(channels=INJECTED, blocks=[5], tokens=_left_half()), record,
                              Scale(rho, channels=INJECTED, blocks=[5])])
    x = record.recording.tensor("image", 5, 0)[0].reshape(4, 4, 64)
    assert torch.all(x[:, :2, INJECTED] == 0) and torch.all(x[:, 2:, 11].abs() > 100)
    assert seen_t == [1000.0, 500.0]


def test_text_stream_edits_reach_the_block(pipe, baseline):
    record = Record(points=("text",), blocks=[2], steps=[0], full=True)
    images, _ = sample_with(pipe, [Zero(channels=[0, 1], tokens="text", blocks=[2]), record])
    assert torch.all(record.recording.tensor("text", 2, 0)[..., [0, 1]] == 0)
    assert not torch.equal(images, baseline)


def _left_half():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :2] = True
    return mask


# ------------------------------------------------------------------------------ channel sets and ops


def synthetic_stream():
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    x[..., 11] += 400
    x[..., 42] -= 250
    return x


def test_channel_sets_for_fair_controls():
    x = synthetic_stream()
    assert DetectedChannels().select_in(x) == INJECTED
    bottom = ControlChannels("bottom").select_in(x)
    random = ControlChannels("random", seed=3).select_in(x)
    matched = ControlChannels("matched").select_in(x)
    for control in (bottom, random, matched):
        assert len(control) == 2 and not set(control) & set(INJECTED)
    mean_abs = x.abs().mean(dim=(0, 1))
    assert bottom == sorted(mean_abs.argsort()[:2].tolist())
    assert ControlChannels("random", k=5).select_in(x) != ControlChannels("random", k=5, seed=1).select_in(x)
    assert parse_channels("top:2").select_in(x) == INJECTED
    assert parse_channels("11,42") == ExplicitChannels((11, 42))
    assert isinstance(parse_channels("matched"), ControlChannels)


def test_ops_set_mean_clamp_and_scale():
    x = synthetic_stream()
    mask = torch.zeros(16, 64, dtype=torch.bool)
    mask[:, 11] = True
    means = torch.arange(64.0)
    torch.testing.assert_close(MeanOp(means).values(x, mask, Where(3, 0))[0, :, 11], torch.full((16,), 11.0))
    clamped = Clamp(-50, 50).op.values(x, mask, Where(3, 0))
    assert clamped.abs().max() <= 50
    assert torch.equal(ScaleOp(lambda t: t / 1000).values(x, mask, Where(3, 0, t=500.0)), x * 0.5)
    assert parse_op("clamp:50") == Clamp(-50, 50).op
    with pytest.raises(InvalidArgumentError, match="not an operation"):
        parse_op("shrink")
    with pytest.raises(InvalidArgumentError, match="op 'mean' sets channels to their mean measured across inputs"):
        parse_op("mean")


def test_set_mean_writes_the_mean_measured_across_other_prompts_and_keeps_other_channels_bit_exact(pipe):
    from ditf.massive import merge_stats_tables

    tables = [record_reference(pipe, prompt, blocks=[6], **SAMPLING)[1].table() for prompt in ("a dog", "a tree")]
    means = merge_stats_tables(tables)  # one fixed value per channel, block and step, over prompts and tokens
    record = Record(blocks=[6], steps=[1], full=True)
    sample_with(pipe, [record])
    before = record.recording.tensor("image", 6, 1)
    record_after = Record(blocks=[6], steps=[1], full=True)
    sample_with(pipe, [SetMean(channels=[11], means=means, blocks=[6], steps=[1]), record_after])
    after = record_after.recording.tensor("image", 6, 1)
    others = [c for c in range(64) if c != 11]
    assert torch.equal(after[..., others], before[..., others])
    expected = (tables[0][(6, 1)].mean[11] + tables[1][(6, 1)].mean[11]) / 2  # both prompts have 16 tokens
    torch.testing.assert_close(after[0, :, 11], expected.expand(16))
    assert not torch.allclose(after[0, :, 11], before[0, :, 11].mean().expand(16))  # not the sample's own mean
    with pytest.raises(InvalidArgumentError, match=r"the means table has no statistics at block 7, step 1"):
        sample_with(pipe, [SetMean(channels=[11], means=means, blocks=[7], steps=[1])])
    with pytest.raises(InvalidArgumentError, match="the means have C=3 channels but this model's stream has C=64"):
        sample_with(pipe, [SetMean(channels=[1], means=torch.zeros(3))])


def test_a_channel_index_out_of_range_names_the_width(pipe):
    with pytest.raises(InvalidArgumentError, match=r"\[64\] are out of range; valid channel indices are 0\.\.63"):
        sample_with(pipe, [Zero(channels=[11, 64], blocks=[0])])
    assert leftover_hooks(pipe.transformer) == []


# ------------------------------------------------------------------------------ Detail Guidance


def test_detail_guidance_with_zero_weight_is_the_identity(pipe, baseline):
    images, session = sample_with(pipe, [DetailGuidance(block=10, weight=0.0)])
    assert torch.equal(images, baseline)
    assert session.branches_seen == {"cond", "detail"}


def test_detail_guidance_adds_the_disrupted_branch_difference_in_its_window(pipe, baseline):
    guidance = DetailGuidance(block=10, weight=2.0, steps=[1])
    images, session = sample_with(pipe, [guidance])
    assert (images - baseline).abs().max() > 0
    assert [entry["step"] for entry in guidance.log] == [1]
    record = guidance.describe()
    assert record["disrupted_channels"] == [{"step": 1, "channels": INJECTED}]
    assert record["disruption"]["op"] == "zero" and record["block"] == 10
    assert session.calls == 3  # two steps + one extra, disrupted prediction
    assert leftover_hooks(pipe.transformer) == []


def test_detail_guidance_only_guides_the_conditional_call_under_true_cfg(pipe):
    guidance = DetailGuidance(block=10, weight=1.0)
    with intervene(pipe, [guidance]) as session:
        sample(pipe, negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=1)
    assert session.calls == 3 and session.branches_seen == {"cond", "uncond", "detail"}
    assert [entry["applied_weight"] for entry in guidance.log] == [0.5]  # w / g, so the final term is w (D - D_m)


# ------------------------------------------------------------------------------ transport


def test_transport_with_a_full_mask_from_the_same_prompt_is_the_identity(pipe, baseline):
    source_output, source = record_trajectory(pipe, "a cat", blocks="all", channels="all", **SAMPLING)
    assert torch.equal(source_output.images, baseline) and source.complete
    images, session = sample_with(pipe, [Transport(source)])
    assert torch.equal(images, baseline)
    assert session.actions[0].applied == 29 * 2


def test_transport_from_another_prompt_writes_its_ma_channels(pipe, baseline):
    _, source = record_trajectory(pipe, "a dog", blocks="5-20", **SAMPLING)
    assert source.channels(7, 1, "cond") == INJECTED and source.values(7, 1, "cond").shape == (1, 16, 2)
    record = Record(blocks=[7], steps=[1], full=True)
    transport = Transport(source, blocks="5-20")
    images, _ = sample_with(pipe, [transport, record])
    written = record.recording.tensor("image", 7, 1)
    torch.testing.assert_close(written[..., INJECTED], source.values(7, 1, "cond"), rtol=0, atol=0)
    assert not torch.equal(images, baseline)
    assert {tuple(entry["channels"]) for entry in transport.log} == {(11, 42)}


def test_transport_between_different_shapes_is_refused(pipe):
    wrong = TransportSource.from_tensors({(0, s, "cond"): torch.zeros(1, 9, 64) for s in (0, 1)},
                                         timesteps={0: 1000.0, 1: 500.0}, meta={"time_units": "scheduler"})
    with pytest.raises(InvalidArgumentError, match=r"source image stream has shape \(1, 9, 64\) but the target's is \(1, 16, 64\)"):
        sample_with(pipe, [Transport(wrong, blocks=[0])])
    with pytest.raises(InvalidArgumentError, match=r"no image stream at blocks \[1\]"):
        sample_with(pipe, [Transport(wrong, blocks=[0, 1])])
    assert leftover_hooks(pipe.transformer) == []


def test_subject_driven_transport_from_a_noised_reference_image(pipe, baseline):
    reference = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    source = record_image_trajectory(pipe, reference, [1000.0, 500.0], blocks="5-20", size=(64, 64), progress=False)
    assert source.steps == [0, 1] and source.timesteps == {0: 1000.0, 1: 500.0}
    transport = Transport(source, blocks="5-20", branch="cond", spatial="cluster")
    images, _ = sample_with(pipe, [transport])
    fractions = [entry["spatial_fraction"] for entry in transport.log]
    assert all(0 < f < 1 for f in fractions) and not torch.equal(images, baseline)


def test_transport_along_another_schedule_is_refused(pipe):
    reference = np.full((64, 64, 3), 128, dtype=np.uint8)
    source = record_image_trajectory(pipe, reference, [900.0, 400.0], blocks=[5], size=(64, 64), progress=False)
    with pytest.raises(InvalidArgumentError, match="source was recorded at t=900 but the target runs at t=1000"):
        sample_with(pipe, [Transport(source, blocks=[5], branch="cond")])


def test_presets_run_source_and_target_with_the_same_seed(pipe, baseline):
    kwargs = dict(num_inference_steps=2, max_sequence_length=8, output_type="pt")
    same = prompt_interpolation(pipe, "a cat", "a cat", blocks="all", channels="all", height=64, width=64, **kwargs)
    assert torch.equal(same.output.images, baseline) and torch.equal(same.baseline.images, baseline)
    reference = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    subject = subject_driven(pipe, "a cat", reference, blocks="10-20", height=64, width=64, progress=False, **kwargs)
    assert torch.equal(subject.baseline.images, baseline) and not torch.equal(subject.output.images, baseline)
    assert subject.record["interventions"][0]["spatial"] == "cluster"
