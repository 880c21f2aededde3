"""DIFT and DINOv2 baselines on tiny random models saved to disk and loaded back the way users load them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditf.baselines import (
    BASELINES,
    BaselineExtractor,
    DiftFeaturizer,
    Dinov2Featurizer,
    baseline_from_name,
    baseline_settings,
    get_baseline,
)
from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from tiny_models import clip_text_encoder, clip_tokenizer, kl_vae, randomize

SD21_BETAS = (0.00085, 0.012)  # SD-2.1 scheduler config: scaled_linear betas over 1000 steps


# ---------------------------------------------------------------- tiny models
def save_tiny_sd_pipeline(folder: Path) -> Path:
    """An SD-2.1-shaped pipeline: 4-level UNet (3 downsamplings), 8x VAE, CLIP text encoder, DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer(folder.parent / "sd_clip_vocab")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16, 16, 16),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=SD21_BETAS[0], beta_end=SD21_BETAS[1], beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=kl_vae(4), text_encoder=clip_text_encoder(len(tokenizer), hidden=32),
                            tokenizer=tokenizer, unet=randomize(unet), scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def save_tiny_dinov2(folder: Path, registers: int = 0) -> Path:
    """A 2-layer DINOv2 (patch 14, width 32), optionally with register tokens."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56)
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **shape))
    else:
        model = Dinov2Model(Dinov2Config(**shape))
    randomize(model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def dift(sd_dir) -> DiftFeaturizer:
    return DiftFeaturizer.from_pretrained(str(sd_dir), device="cpu")


@pytest.fixture(scope="module")
def sd_pipeline(sd_dir):
    """The same folder loaded by diffusers itself, for reference computations."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two photos-to-be of different shapes: 48x80 and 70x50 pixels of smooth colour with noise."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (height, width) in (("wide.png", (48, 80)), ("tall.png", (70, 50))):
        ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        paths.append(folder / name)
    return paths


class CallCounter:
    """Counts calls of the modules it is attached to."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in modules]

    def _count(self, *_):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- DIFT
def test_dift_maps_sit_on_the_up_block_grid(dift, images):
    features = dift(images, prompt="a photo of a cat", resolution=64, ensemble=2)

    assert features.shape == (2, 16, 4, 4)  # up block 1: 1/16 of the 64-pixel square, 16 channels
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert dift.feature_stride() == 16
    assert dift([images[0]], resolution=128, ensemble=1).shape == (1, 16, 8, 8)
    assert dift([images[0]], resolution=64, up_block=2, ensemble=1).shape == (1, 16, 8, 8)


def test_dift_follows_the_protocol_written_out_by_hand(dift, sd_pipeline, images):
    """Square bicubic resize, VAE posterior sample x 0.18215, DDPM noising at t, up-block-1 output, mean."""
    t, seed, members = 261, 3, 2
    features = dift([images[0]], prompt="a photo of a cat", t=t, ensemble=members, seed=seed, resolution=64)[0]

    square = Image.open(images[0]).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        posterior = dift.vae.encode(pixels).latent_dist
    latents = (posterior.mean + posterior.std * torch.randn((members, 4, 8, 8), generator=rng)) * 0.18215
    noise = torch.randn((members, 4, 8, 8), generator=rng)
    betas = torch.linspace(SD21_BETAS[0] ** 0.5, SD21_BETAS[1] ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float()
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    embeds = sd_pipeline.encode_prompt("a photo of a cat", "cpu", members, False)[0]
    outputs = []
    handle = sd_pipeline.unet.up_blocks[1].register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        sd_pipeline.unet(noisy, torch.tensor([t] * members), encoder_hidden_states=embeds)
    handle.remove()

    torch.testing.assert_close(features, outputs[0].mean(0), rtol=1e-4, atol=1e-5)


def test_dift_hook_reads_exactly_what_the_full_forward_computes_and_stops_there(dift):
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = dift.encode_prompt("a photo of a dog")
    full = []
    handle = dift.unet.up_blocks[1].register_forward_hook(lambda _m, _a, out: full.append(out))
    with torch.no_grad():
        dift.unet(noisy, torch.tensor([261, 261]), encoder_hidden_states=embeds.expand(2, -1, -1))
    handle.remove()
    later = CallCounter(dift.unet.up_blocks[2], dift.unet.up_blocks[3], dift.unet.conv_out)

    hooked = dift.up_block_output(noisy, 261, embeds, up_block=1)
    later.remove()

    assert torch.equal(hooked, full[0])
    assert later.calls == 0
    assert not dift.unet.up_blocks[1]._forward_hooks  # the tap is gone afterwards


def test_dift_randomness_depends_on_the_seed_only(dift, images):
    first = dift(images, resolution=64, ensemble=2, seed=5)

    assert torch.equal(first, dift(images, resolution=64, ensemble=2, seed=5))
    assert torch.equal(first[1], dift([images[1]], resolution=64, ensemble=2, seed=5)[0])
    assert not torch.allclose(first, dift(images, resolution=64, ensemble=2, seed=6))


def test_dift_prompt_embedding_is_diffusers_encode_prompt(dift, sd_pipeline):
    expected = sd_pipeline.encode_prompt("a photo of a horse", "cpu", 1, False)[0]

    assert torch.equal(dift.encode_prompt("a photo of a horse"), expected)
    assert not torch.equal(dift.encode_prompt(""), expected)


def test_dift_defaults_are_the_papers_and_bad_values_say_what_is_valid(dift, images):
    assert dift.settings() == {**dift.settings(), "t": 261, "up_block": 1, "ensemble": 8, "resolution": 768, "seed": 0,
                               "layer": "unet.up_blocks.1", "extractor": "dift", "dtype": "float32"}
    json.dumps(dift.settings())
    with pytest.raises(InvalidArgumentError, match=r"t=1000 .*0\.\.999"):
        dift(images, t=1000)
    with pytest.raises(InvalidArgumentError, match=r"up_block=4 .*0\.\.3"):
        dift(images, up_block=4)
    with pytest.raises(InvalidArgumentError, match=r"resolution=60 .*multiple of the VAE factor 8"):
        dift(images, resolution=60)


def test_dift_from_modules_needs_a_ddpm_noise_schedule(dift, images):
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

    parts = (dift.unet, dift.vae, dift.text_encoder, dift.tokenizer)
    same_schedule = DiftFeaturizer(*parts, PNDMScheduler.from_config(dift.scheduler.config))
    assert torch.equal(same_schedule(images[0], resolution=64, ensemble=1), dift(images[0], resolution=64, ensemble=1))
    with pytest.raises(UnsupportedLayoutError, match="no DDPM noise schedule.*DDIMScheduler"):
        DiftFeaturizer(*parts, FlowMatchEulerDiscreteScheduler())


def test_dift_folder_that_is_not_a_stable_diffusion_pipeline(tmp_path):
    with pytest.raises(UnknownModelError, match="no model_index.json"):
        DiftFeaturizer.from_pretrained(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UnknownModelError, match="not a Stable Diffusion pipeline.*FluxTransformer2DModel.*DiTFeat"):
        DiftFeaturizer.from_pretrained(str(tmp_path))
    with pytest.raises(UnknownModelError, match="no such folder"):
        DiftFeaturizer.from_pretrained(str(tmp_path / "missing"))


# ---------------------------------------------------------------- DINOv2
def test_dinov2_maps_are_last_block_patch_tokens(dinov2_dir, images):
    fx = Dinov2Featurizer.from_pretrained(str(dinov2_dir), device="cpu", resolution=112)

    features = fx(images)  # 48x80 -> 70x112 (5x8 cells); 70x50 -> 112x84 (8x6 cells)

    assert [tuple(f.shape) for f in features] == [(32, 5, 8), (32, 8, 6)]
    pixels = fx.preprocess(images[0])
    with torch.no_grad():
        outputs = fx.model(pixel_values=pixels, output_hidden_states=True)
    block_out = outputs.hidden_states[-1][0, 1:].reshape(5, 8, 32).permute(2, 0, 1)
    normed = outputs.last_hidden_state[0, 1:].reshape(5, 8, 32).permute(2, 0, 1)
    torch.testing.assert_close(features[0], block_out)
    torch.testing.assert_close(fx(images[0], final_norm=True)[0], normed)


def test_dinov2_drops_register_tokens(tmp_path, images):
    fx = Dinov2Featurizer.from_pretrained(str(save_tiny_dinov2(tmp_path / "reg", registers=4)), device="cpu",
                                          resolution=112)

    features = fx(images[0])[0]

    with torch.no_grad():
        outputs = fx.model(pixel_values=fx.preprocess(images[0]), output_hidden_states=True)
    assert outputs.hidden_states[-1].shape[1] == 1 + 4 + 5 * 8
    torch.testing.assert_close(features, outputs.hidden_states[-1][0, 5:].reshape(5, 8, 32).permute(2, 0, 1))


def test_dinov2_pixels_use_imagenet_mean_and_std(dinov2_dir):
    fx = Dinov2Featurizer.from_pretrained(str(dinov2_dir), device="cpu")
    orange = np.zeros((30, 45, 3), dtype=np.uint8) + np.array([255, 128, 0], dtype=np.uint8)

    pixels = fx.preprocess(orange, resolution=56)  # long side 56, short side 37.3 -> 42

    assert pixels.shape == (1, 3, 42, 56)
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    torch.testing.assert_close(pixels[0, :, 20, 30], torch.tensor(expected), rtol=0, atol=1e-5)


def test_dinov2_ignores_prompt_and_seed(dinov2_dir, images):
    fx = Dinov2Featurizer.from_pretrained(str(dinov2_dir), device="cpu", resolution=56)

    assert torch.equal(fx(images[0], prompt="a photo of a cat", seed=3), fx(images[0]))


def test_dinov2_folder_that_is_not_dinov2(tmp_path, sd_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UnknownModelError, match="not a DINOv2 model: its config.json has model_type 'vit'"):
        Dinov2Featurizer.from_pretrained(str(tmp_path))
    with pytest.raises(UnknownModelError, match="not a DINOv2 model: it has no config.json"):
        Dinov2Featurizer.from_pretrained(str(sd_dir))


# ---------------------------------------------------------------- registry and harness hook-up
def test_registry_names_hub_ids_defaults_and_sources():
    assert set(BASELINES) == {"dift", "dinov2-b14", "dinov2-l14"}
    assert get_baseline("dinov2-l14").hub_id == "facebook/dinov2-large"
    assert get_baseline("dift").prompt_mode == "class"
    assert all(baseline.source for baseline in BASELINES.values())
    with pytest.raises(InvalidArgumentError, match="unknown baseline 'dino'.*dift, dinov2-b14, dinov2-l14"):
        get_baseline("dino")
    with pytest.raises(InvalidArgumentError, match="no setting 't'.*resolution, final_norm"):
        baseline_settings("dinov2-b14", t=261)


def test_baseline_extractor_settings_match_the_loaded_featurizer(sd_dir, dift, dinov2_dir, images):
    extractor = BaselineExtractor("dift", torch.float32, "cpu", model=str(sd_dir), resolution=64, ensemble=2)
    assert extractor._featurizer is None  # settings come without loading the model

    features = extractor(images[0], "a photo of a cat")

    assert features.shape == (16, 4, 4)
    assert extractor.settings == extractor.featurizer.settings()
    assert extractor.prompt_mode == "class"
    assert torch.equal(features, dift([images[0]], prompt="a photo of a cat", resolution=64, ensemble=2)[0])
    assert isinstance(baseline_from_name("dinov2-b14", model=str(dinov2_dir), device="cpu"), Dinov2Featurizer)
