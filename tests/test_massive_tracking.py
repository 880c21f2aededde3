"""Runs, steps and branches come from the pipeline's own signals (tiny FLUX and PixArt-Sigma pipelines, 2 steps).

A pipeline call is a run, `callback_on_step_end` ends a step, `transformer.cache_context(name)` names the branch,
and Detail Guidance's extra forward is `detail` in every session, nested ones included.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_models import FLUX_TINY_MASSIVE, leftover_hooks

from ditf.errors import InvalidArgumentError
from ditf.massive import DetailGuidance, Record, Zero, intervene

INJECTED = FLUX_TINY_MASSIVE
SAMPLING = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt")


def sample(pipe, prompt="a cat", **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**SAMPLING, **extra}).images


def test_two_pipeline_calls_in_one_session_are_two_runs(pipe):
    cond_only = Zero(channels=INJECTED, blocks=[3], branch="cond")
    record = Record(blocks=[3], branch="all")
    with intervene(pipe, [cond_only, record]) as session:
        assert "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters  # the watched call keeps its signature
        sample(pipe)
        sample(pipe, prompt="a dog")
    assert [(e["step"], e["branch"]) for e in cond_only.log] == [(0, "cond"), (1, "cond")] * 2  # both runs edited
    assert session.branches_seen == {"cond"} and session.steps_seen == {0, 1}
    assert record.recording.branches == ["cond"] and record.recording.table()[(3, 0)].n_calls == 2
    assert [run["steps_from"] for run in session.runs] == ["callback_on_step_end"] * 2
    assert type(pipe).__name__ == "FluxPipeline" and "cache_context" not in vars(pipe.transformer)


def test_a_pipeline_without_step_callbacks_still_has_one_run_per_call(tmp_path):
    from diffusers import PixArtSigmaPipeline
    from tiny_pixart import build_pixart_pipeline

    pixart = PixArtSigmaPipeline.from_pretrained(build_pixart_pipeline(tmp_path / "pixart", sigma=True))
    pixart.set_progress_bar_config(disable=True)
    edit = Zero(channels=[3], blocks=[0], branch="cond")
    call = dict(num_inference_steps=2, height=64, width=64, use_resolution_binning=False, output_type="pt")
    with intervene(pixart, [edit]) as session:
        for _ in range(2):
            pixart("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert [(e["step"], e["branch"]) for e in edit.log] == [(0, "cond"), (1, "cond")] * 2
    assert [run["steps_from"] for run in session.runs] == ["timesteps"] * 2
    assert [run["cfg_scale"] for run in session.runs] == [4.5, 4.5]  # PixArt's default guidance_scale


def test_the_users_step_callback_still_runs_with_the_pipelines_indices(pipe):
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append((index, float(timestep)))
        return {"latents": tensors["latents"] * 1.0}

    record = Record(blocks=[0])
    with intervene(pipe, [record]):
        sample(pipe, callback_on_step_end=callback)
    assert seen == [(0, 1000.0), (1, 500.0)] and record.recording.timesteps == {0: 1000.0, 1: 500.0}


def test_a_call_the_pipeline_names_uncond_is_uncond_even_when_it_comes_first(pipe):
    captured = {}
    grab = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: captured.update(kwargs), with_kwargs=True)
    sample(pipe, num_inference_steps=1)
    grab.remove()
    branches = []
    with intervene(pipe, [Record(blocks=[0], branch="uncond")]) as session:
        with session.at_step(0, t=1000.0, total_steps=1), pipe.transformer.cache_context("uncond"), torch.no_grad():
            pipe.transformer(**captured)  # the first call of the step: by call order it would be cond
            branches.append(session.state.branches)
    assert branches == [["uncond"]]


def test_nested_sessions_label_detail_guidance_extra_forward_detail(pipe):
    guidance = DetailGuidance(block=10, weight=1.0)
    detail, cond = Record(blocks=[10], branch="detail"), Record(blocks=[10], branch="cond")
    with intervene(pipe, [guidance]) as outer:
        with intervene(pipe, [detail, cond]) as inner:
            sample(pipe)
    assert outer.branches_seen == inner.branches_seen == {"cond", "detail"}
    assert detail.recording.table("image", "detail").steps == [0, 1]
    assert cond.recording.table("image", "cond")[(10, 1)].n_calls == 1  # the detail forward is not filed as cond
    assert inner.steps_seen == {0, 1} and [entry["step"] for entry in guidance.log] == [0, 1]
    assert leftover_hooks(pipe.transformer) == [] and type(pipe).__name__ == "FluxPipeline"


def test_a_subclass_of_a_known_pipeline_has_its_cfg_layout(flux_pipeline_dir):
    from diffusers import FluxPipeline

    class MyFluxPipeline(FluxPipeline):
        """A user's subclass: ditf finds FLUX's CFG layout through isinstance."""

    mine = MyFluxPipeline.from_pretrained(flux_pipeline_dir)
    mine.set_progress_bar_config(disable=True)
    uncond = Record(blocks=[0], branch="uncond")
    with intervene(mine, [uncond]) as session:
        sample(mine, negative_prompt="blurry", true_cfg_scale=2.0)
    assert uncond.recording.table("image", "uncond").steps == [0, 1] and session.runs[0]["cfg_scale"] == 2.0
    assert type(mine) is MyFluxPipeline


def test_an_action_runs_in_one_session_and_is_listed_once(pipe):
    zero = Zero(channels=INJECTED, blocks=[0])
    with pytest.raises(InvalidArgumentError, match="the same Zero object is listed twice"):
        with intervene(pipe, [zero, zero]):
            pass
    fresh = Zero(channels=INJECTED, blocks=[0])
    with intervene(pipe, [fresh]):
        sample(pipe, num_inference_steps=1)
    with pytest.raises(InvalidArgumentError, match="this Zero object already ran in an earlier intervene\\(\\) session"):
        with intervene(pipe, [fresh]):
            pass
    assert leftover_hooks(pipe.transformer) == []
