"""Detail Guidance means the paper's w whatever the pipeline does with CFG (tiny SD3, PixArt-Sigma and FLUX pipelines).

Each test samples one step with DG, keeps the transformer's own outputs (a forward hook registered before the
session: the conditional, unconditional and disrupted predictions as the model made them) and the prediction the
pipeline hands its scheduler, and checks that prediction against the paper's formula written out by hand:

    D_hat = u + g (c - u) + w (c - c_m)    with CFG (g the pipeline's CFG scale)
    D_hat = c + w (c - c_m)                without an unconditional branch
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tiny_models import leftover_hooks
from tiny_pixart import build_pixart_pipeline
from tiny_sd3 import build_sd3_pipeline

from ditf.massive import DetailGuidance, intervene

MASSIVE = (3, 7)
WEIGHT = 2.0
BLOCK = 1


def load(name: str, folder):
    import diffusers

    builders = {"sd3": (partial(build_sd3_pipeline, massive_channels=MASSIVE), "StableDiffusion3Pipeline", {}),
                "pixart-sigma": (partial(build_pixart_pipeline, sigma=True, massive_channels=MASSIVE),
                                 "PixArtSigmaPipeline", {"use_resolution_binning": False, "clean_caption": False})}
    build, class_name, extra = builders[name]
    pipe = getattr(diffusers, class_name).from_pretrained(build(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def guided_step(pipe, guidance: DetailGuidance, **call):
    """One DG step: (the transformer's raw outputs per call, the prediction the scheduler received)."""
    raw, given = [], []
    spy = pipe.transformer.register_forward_hook(lambda _m, _a, out: raw.append(out[0].detach().clone()))
    step = pipe.scheduler.step

    def scheduler_step(model_output, *args, **kwargs):
        given.append(model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = scheduler_step
    try:
        with intervene(pipe, [guidance]):
            pipe("a cat", num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0),
                 output_type="latent", **call)
    finally:
        spy.remove()
        del pipe.scheduler.step
    assert leftover_hooks(pipe.transformer) == []
    return raw, given[0]


@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_with_cfg_the_final_prediction_is_the_papers_combination(family, tmp_path):
    pipe, extra = load(family, tmp_path / family)
    guidance = DetailGuidance(BLOCK, WEIGHT)
    (both, disrupted), prediction = guided_step(pipe, guidance, guidance_scale=5.0, **extra)

    uncond, cond = both.chunk(2)  # diffusers batches CFG as [uncond, cond]
    cond_m = disrupted.chunk(2)[1]
    expected = uncond + 5.0 * (cond - uncond) + WEIGHT * (cond - cond_m)
    channels = prediction.shape[1]  # PixArt's scheduler gets the noise half of its learned-sigma output
    torch.testing.assert_close(prediction, expected[:, :channels], rtol=1e-4, atol=1e-5)
    assert (cond - cond_m).abs().max() > 1e-3  # the disruption changed the prediction, so the test can fail
    assert [(entry["cfg_scale"], entry["applied_weight"]) for entry in guidance.log] == [(5.0, WEIGHT / 5.0)]


@pytest.mark.parametrize("family", ["sd3", "pixart-sigma"])
def test_without_cfg_the_weight_is_applied_as_is(family, tmp_path):
    pipe, extra = load(family, tmp_path / family)
    guidance = DetailGuidance(BLOCK, WEIGHT)
    (cond, disrupted), prediction = guided_step(pipe, guidance, guidance_scale=1.0, **extra)

    expected = cond + WEIGHT * (cond - disrupted)
    torch.testing.assert_close(prediction, expected[:, :prediction.shape[1]], rtol=1e-4, atol=1e-5)
    assert [(entry["cfg_scale"], entry["applied_weight"]) for entry in guidance.log] == [(None, WEIGHT)]


def test_flux_embedded_guidance_is_not_cfg_and_true_cfg_is(pipe):
    embedded = DetailGuidance(10, WEIGHT)
    (cond, disrupted), prediction = guided_step(pipe, embedded, guidance_scale=3.5, max_sequence_length=8)
    torch.testing.assert_close(prediction, cond + WEIGHT * (cond - disrupted), rtol=1e-4, atol=1e-5)
    assert embedded.log[0]["applied_weight"] == WEIGHT  # FLUX.1-dev's guidance_scale is embedded: no division

    true_cfg = DetailGuidance(10, WEIGHT)
    (cond, disrupted, uncond), prediction = guided_step(pipe, true_cfg, true_cfg_scale=4.0, negative_prompt="blurry",
                                                        max_sequence_length=8)
    expected = uncond + 4.0 * (cond - uncond) + WEIGHT * (cond - disrupted)
    torch.testing.assert_close(prediction, expected, rtol=1e-4, atol=1e-5)
    assert true_cfg.log[0]["applied_weight"] == WEIGHT / 4.0
