"""Single-file checkpoints: the Black Forest Labs FLUX.1 layout and diffusers' own, loaded offline with `config=`."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import ditf.single_file as single_file
from ditf import DiTFeaturizer
from ditf.arch.flux import bfl_flux_key_map, convert_bfl_flux_state_dict
from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from ditf.single_file import load_single_file
from tiny_models import FLUX_TINY, REFERENCE_TOLERANCE, reference_error

BFL_FILE = FLUX_TINY / "flux_tiny_bfl.safetensors"
CONFIG = FLUX_TINY / "diffusers_transformer"
DIFFUSERS_FILE = CONFIG / "diffusion_pytorch_model.safetensors"
CASE = load_file(FLUX_TINY / "flux_tiny_case.safetensors")
META = json.loads((FLUX_TINY / "flux_tiny_case.json").read_text())


@pytest.fixture(scope="module")
def diffusers_weights():
    return FluxTransformer2DModel.from_pretrained(CONFIG).state_dict()


@pytest.fixture(scope="module")
def full_from_bfl():
    return DiTFeaturizer(load_single_file(BFL_FILE, config=CONFIG))


def extract(fx: DiTFeaturizer, block: int, discard):
    return fx.from_latents(CASE["latents"], CASE["noise"], prompt_embeds=CASE["txt"], pooled_prompt_embeds=CASE["pooled"],
                           t=META["t"] * 1000, block=block, guidance=META["guidance"], discard=discard, return_parts=True)


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]):
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in state.items():
        assert torch.equal(tensor, expected[key]), key


# ------------------------------------------------------------------ conversion
def test_bfl_file_becomes_exactly_the_diffusers_weights(full_from_bfl, diffusers_weights):
    assert_same_weights(full_from_bfl.transformer, diffusers_weights)


def test_in_memory_conversion_handles_the_all_in_one_prefix(diffusers_weights):
    comfy = {f"model.diffusion_model.{key}": tensor for key, tensor in load_file(BFL_FILE).items()}
    converted = convert_bfl_flux_state_dict(comfy)
    assert set(converted) == set(diffusers_weights)
    assert all(torch.equal(converted[key], diffusers_weights[key]) for key in converted)


def test_key_map_reads_the_width_from_img_in_and_splits_fused_tensors():
    width, mlp = 3072, 12288
    shapes = {"img_in.weight": (width, 64), "double_blocks.0.img_attn.qkv.weight": (3 * width, width),
              "double_blocks.0.img_mod.lin.weight": (6 * width, width),
              "single_blocks.0.linear1.weight": (3 * width + mlp, width),
              "final_layer.adaLN_modulation.1.weight": (2 * width, width)}
    sources = bfl_flux_key_map(shapes)
    assert (sources["transformer_blocks.0.attn.to_k.weight"].start, sources["transformer_blocks.0.attn.to_k.weight"].stop) == (width, 2 * width)
    mlp_in = sources["single_transformer_blocks.0.proj_mlp.weight"]
    assert (mlp_in.key, mlp_in.start, mlp_in.stop) == ("single_blocks.0.linear1.weight", 3 * width, 3 * width + mlp)
    assert sources["norm_out.linear.weight"].swap_halves
    assert not sources["transformer_blocks.0.norm1.linear.weight"].swap_halves


def test_all_in_one_file_reads_only_the_transformer_keys(tmp_path, diffusers_weights):
    """ComfyUI-style file: transformer under model.diffusion_model., plus other components that are ignored."""
    tensors = {f"model.diffusion_model.{key}": tensor for key, tensor in load_file(BFL_FILE).items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)
    save_file(tensors, tmp_path / "flux_comfy.safetensors")
    assert_same_weights(load_single_file(tmp_path / "flux_comfy.safetensors", config=CONFIG), diffusers_weights)


def test_diffusers_layout_single_file_loads_as_is(diffusers_weights):
    assert_same_weights(load_single_file(DIFFUSERS_FILE, config=CONFIG), diffusers_weights)
    partial = load_single_file(DIFFUSERS_FILE, config=CONFIG, block=20)
    assert isinstance(partial.single_transformer_blocks[2], torch.nn.Identity)
    assert all(torch.equal(t, diffusers_weights[k]) for k, t in partial.state_dict().items())


# ------------------------------------------------------------------ features equal the authors' reference
@pytest.mark.parametrize("block", META["blocks"])
@pytest.mark.parametrize("loading", ["full", "partial"])
def test_features_from_the_bfl_file_equal_the_reference(full_from_bfl, block, loading):
    fx = full_from_bfl if loading == "full" else DiTFeaturizer(load_single_file(BFL_FILE, config=CONFIG, block=block))
    plain = extract(fx, block, None)
    assert reference_error(plain.raw, CASE[f"k{block}_raw"]) <= REFERENCE_TOLERANCE
    assert reference_error(plain.features, CASE[f"k{block}_ditf"]) <= REFERENCE_TOLERANCE
    for discard in (META["massive_channels"], "auto"):
        discarded = extract(fx, block, discard)
        assert discarded.discarded == META["massive_channels"]
        assert reference_error(discarded.features, CASE[f"k{block}_ditf_cd"]) <= REFERENCE_TOLERANCE


def test_partial_loading_reads_only_the_tensors_of_blocks_up_to_k(monkeypatch):
    read = []
    original = single_file.TensorSource.read
    monkeypatch.setattr(single_file.TensorSource, "read", lambda self, *a: read.append(self.key) or original(self, *a))
    model = load_single_file(BFL_FILE, config=CONFIG, block=20)  # all 19 double blocks + single blocks 0, 1
    assert {key.split(".")[1] for key in read if key.startswith("single_blocks.")} == {"0", "1"}
    assert len({key.split(".")[1] for key in read if key.startswith("double_blocks.")}) == 19
    assert sum(isinstance(b, torch.nn.Identity) for b in model.single_transformer_blocks) == 8


def test_from_pretrained_takes_a_bfl_file_and_a_config_folder():
    block = META["blocks"][-1]
    fx = DiTFeaturizer.from_pretrained(str(BFL_FILE), config=str(CONFIG), block=block, device="cpu")
    assert reference_error(extract(fx, block, "auto").features, CASE[f"k{block}_ditf_cd"]) <= REFERENCE_TOLERANCE


def test_a_pipeline_folder_as_config_brings_its_vae_and_text_encoders(flux_pipeline_dir):
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    settings = dict(prompt="a cat", t=261, block=24, ensemble=2, resolution=96)
    from_file = DiTFeaturizer.from_pretrained(str(BFL_FILE), config=str(flux_pipeline_dir), block=24, device="cpu")
    from_folder = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), device="cpu")
    assert from_file.vae is not None and from_file.text_pipeline is not None
    assert torch.equal(from_file(image, **settings)[0], from_folder(image, **settings)[0])


# ------------------------------------------------------------------ errors that say what to do
def test_missing_config_says_to_pass_a_local_config_folder():
    with pytest.raises(InvalidArgumentError, match=r"flux_tiny_bfl.safetensors.*config=<local folder>.*never fetches"):
        load_single_file(BFL_FILE)
    with pytest.raises(InvalidArgumentError, match=r"config='black-forest-labs/FLUX.1-dev' is not a local folder"):
        load_single_file(BFL_FILE, config="black-forest-labs/FLUX.1-dev")


def test_unknown_layout_names_the_keys_found_and_the_known_layouts(tmp_path):
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    with pytest.raises(UnsupportedLayoutError, match=r"down_blocks\.0\.resnets.*diffusers FluxTransformer2DModel.*Black Forest Labs"):
        load_single_file(tmp_path / "unet.safetensors", config=CONFIG)


def test_unexpected_tensor_in_a_bfl_file_is_reported(tmp_path):
    tensors = load_file(BFL_FILE)
    tensors["double_blocks.0.img_attn.qkv.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "with_lora.safetensors")
    with pytest.raises(UnsupportedLayoutError, match=r"does not know where to put.*lora_A"):
        load_single_file(tmp_path / "with_lora.safetensors", config=CONFIG)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_single_layers": 12}, r"lacks 28 tensors that the model of config.json has.*single_transformer_blocks\.10"),
    ({"num_layers": 18}, r"holds 32 tensors that the model of config.json does not have.*transformer_blocks\.18"),
    ({"attention_head_dim": 16, "axes_dims_rope": [4, 6, 6]}, r"has shape \[64, 256\].*needs \[32, 256\].*config= must describe"),
])
def test_a_config_of_another_model_is_refused_before_reading(tmp_path, change, message):
    config = json.loads((CONFIG / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InvalidArgumentError, match=message):
        load_single_file(BFL_FILE, config=tmp_path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    shutil.copy(CONFIG / "config.json", tmp_path / "model.ckpt")
    with pytest.raises(UnknownModelError, match=r"not a readable safetensors file.*safetensors format only"):
        load_single_file(tmp_path / "model.ckpt", config=CONFIG)
