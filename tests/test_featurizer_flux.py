"""DiTFeaturizer on a tiny FLUX pipeline folder, loaded the way users load real models.

What every family's featurizer must do (feature shape, seeds and batch placement, block ranges, partial
loading) is in test_arch_common.py; these are the featurizer's own options, exercised on FLUX.
"""

import warnings

import numpy as np
import pytest
import torch

import ditf.features.featurizer as featurizer_module
from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError

IMAGE = (np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8)
SETTINGS = dict(t=261, block=28, ensemble=2, resolution=128)


@pytest.fixture(scope="module")
def fx(flux_pipeline_dir):
    return DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), device="cpu")


def test_vae_sampling_modes_draw_what_they_say(fx):
    """per_member: one posterior sample per ensemble member; shared: one sample for all (the same first draw);
    mode: the posterior mean, no draw. Each gives other features."""
    latents = {m: fx.noisy_latents(IMAGE, fx.settings(vae_sample=m, **SETTINGS)) for m in ("per_member", "shared", "mode")}
    per_member, shared, mode = (latents[m].clean for m in ("per_member", "shared", "mode"))
    assert per_member.shape[0] == 2 and not torch.equal(per_member[0], per_member[1])
    assert shared.shape[0] == 1 and torch.equal(shared[0], per_member[0])
    pixels = latents["mode"].prepared.pixels
    with torch.no_grad():
        mean = fx.arch.normalize_latents(fx.vae.encode(pixels).latent_dist.mean)
    assert mode.shape[0] == 1 and torch.equal(mode, mean)
    features = {m: fx([IMAGE], vae_sample=m, **SETTINGS)[0] for m in latents}
    assert not torch.equal(features["per_member"], features["shared"])
    assert not torch.equal(features["shared"], features["mode"])
    with pytest.raises(InvalidArgumentError, match="vae_sample"):
        fx([IMAGE], vae_sample="twice", **SETTINGS)


def test_text_encoders_run_once_per_distinct_prompt(fx):
    calls = []
    handle = fx.text_pipeline.text_encoder_2.register_forward_hook(lambda *a: calls.append(1))
    try:
        for _ in range(3):
            fx([IMAGE], prompt="a dog on grass", **SETTINGS)
        fx([IMAGE], prompt="a cat", **SETTINGS)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_prompt_embeds_bypass_the_text_encoders(fx):
    cond = fx.encode_prompt("a cat")
    direct = fx([IMAGE], prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], **SETTINGS)
    assert torch.equal(direct[0], fx([IMAGE], prompt="a cat", **SETTINGS)[0])
    with pytest.raises(InvalidArgumentError, match="pooled_prompt_embeds"):
        fx([IMAGE], prompt_embeds=cond["prompt_embeds"], **SETTINGS)


def test_building_from_modules_equals_loading_the_folder(fx):
    pipe = fx.text_pipeline
    built = DiTFeaturizer(fx.transformer, fx.vae, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                          tokenizers=[pipe.tokenizer, pipe.tokenizer_2])
    assert torch.equal(built([IMAGE], prompt="a cat", **SETTINGS)[0], fx([IMAGE], prompt="a cat", **SETTINGS)[0])


def test_ablation_switches(fx):
    raw = fx([IMAGE], normalize=False, modulate=False, discard=None, **SETTINGS)[0]
    ln_only = fx([IMAGE], modulate=False, discard=None, **SETTINGS)[0]
    assert raw[[11, 42]].abs().min() > 100  # massive channels survive in the raw feature
    assert torch.allclose(ln_only.mean(0), torch.zeros(1), atol=1e-4)


def test_long_prompt_warns_about_truncation(fx):
    with pytest.warns(UserWarning, match="tokenizer.*at most 77"):
        fx.encode_prompt("a " * 100)


def test_a_timestep_outside_the_range_names_the_range(fx):
    with pytest.raises(InvalidArgumentError, match="outside 0..1000"):
        fx([IMAGE], **{**SETTINGS, "t": 1261})


def test_bf16_on_a_cpu_that_cannot_run_it(monkeypatch, flux_pipeline_dir):
    monkeypatch.setattr(featurizer_module, "cpu_runs_bfloat16", lambda: False)
    with pytest.raises(InvalidArgumentError, match="bfloat16 cannot run on this CPU.*float32"):
        DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), torch_dtype=torch.bfloat16, device="cpu", block=19)


def test_released_text_encoders_keep_cached_prompts(flux_pipeline_dir):
    fx = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), device="cpu", block=19)
    fx.encode_prompt("a cat")
    fx.release_text_encoders()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fx([IMAGE], prompt="a cat", **{**SETTINGS, "block": 19})
    with pytest.raises(InvalidArgumentError, match="released"):
        fx([IMAGE], prompt="a dog", **{**SETTINGS, "block": 19})


def test_a_misspelt_keyword_is_refused_with_the_valid_ones(fx):
    with pytest.raises(InvalidArgumentError, match=r"unknown setting 'discrad' \(did you mean 'discard'\?\).*Valid"):
        fx([IMAGE], discrad=[11, 42], **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="did you mean 'discard'"):
        fx.from_latents(torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), discrad=None, **SETTINGS)


def test_several_blocks_from_latents_stop_after_the_deepest(fx):
    """from_latents(block=[3, 20]) equals single-block calls and never runs the blocks after 20."""
    latents = fx.noisy_latents(IMAGE, fx.settings(**SETTINGS))
    later = []
    handle = fx.arch.block(21).module.register_forward_pre_hook(lambda *a: later.append(1))
    try:
        several = fx.from_latents(latents.clean, latents.noise, **{**SETTINGS, "block": [3, 20]})
    finally:
        handle.remove()
    assert sorted(several) == [3, 20] and later == []
    for k in (3, 20):
        alone = fx.from_latents(latents.clean, latents.noise, **{**SETTINGS, "block": k})
        assert torch.equal(several[k].features, alone.features) and several[k].discarded == alone.discarded


def test_call_and_from_latents_default_to_the_same_discard(fx):
    """Both take `discard` from the same settings: "auto" unless told otherwise."""
    latents = fx.noisy_latents(IMAGE, fx.settings(**SETTINGS))
    from_image = fx.extract(IMAGE, **SETTINGS)
    from_latents = fx.from_latents(latents.clean, latents.noise, **SETTINGS)
    assert from_image.settings.discard == from_latents.settings.discard == "auto"
    assert from_image.discarded == from_latents.discarded == [11, 42]
    assert torch.equal(from_image.features, from_latents.features)


def test_model_offload_moves_every_model_back_to_the_cpu_after_a_call(flux_pipeline_dir, monkeypatch):
    """offload="model": a model runs on the device only while it is used; the others go back to the CPU before
    it runs, and all of them when the call returns (accelerate's `offload()` is what moves a model to the CPU)."""
    from accelerate.hooks import CpuOffload, UserCpuOffloadHook

    events: list[tuple[str, str]] = []
    run, offload = CpuOffload.pre_forward, UserCpuOffloadHook.offload
    monkeypatch.setattr(CpuOffload, "pre_forward",
                        lambda self, module, *a, **k: events.append(("run", type(module).__name__)) or run(self, module, *a, **k))
    monkeypatch.setattr(UserCpuOffloadHook, "offload",
                        lambda self: events.append(("offload", type(self.model).__name__)) or offload(self))
    fx = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), device="cpu", offload="model", block=28)
    events.clear()
    fx([IMAGE, IMAGE], prompt="a cat", **SETTINGS, progress=False)
    models = {name for kind, name in events if kind == "run"}
    assert models == {"CLIPTextModel", "T5EncoderModel", "AutoencoderKL", "FluxTransformer2DModel"}
    for name in models:  # the last thing that happens to every model is that it goes back to the CPU
        assert [kind for kind, model in events if model == name][-1] == "offload"
    transformer_runs = [i for i, event in enumerate(events) if event == ("run", "FluxTransformer2DModel")]
    assert ("offload", "AutoencoderKL") in events[:transformer_runs[0]]  # the VAE left before the transformer ran


def test_several_blocks_from_one_pass_equal_single_block_calls(fx):
    """block=[19, 24, 28]: one forward that stops after block 28, each block with its own AdaLN and discard."""
    calls = []
    handle = fx.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        several = fx([IMAGE], **{**SETTINGS, "block": [19, 24, 28]})[0]
    finally:
        handle.remove()
    assert sorted(several) == [19, 24, 28] and len(calls) == 1  # one transformer call for the ensemble of 2
    for k in (19, 24, 28):
        assert torch.equal(several[k], fx([IMAGE], **{**SETTINGS, "block": k})[0])
    parts = fx.extract(IMAGE, **{**SETTINGS, "block": [19, 28]}, return_parts=True)
    assert parts[19].settings.block == 19 and parts[28].discarded == [11, 42] and parts[19].raw.shape[0] == 64
