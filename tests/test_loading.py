"""Loading models the way users do, and the errors that tell them what to fix."""

import json
import socket

import httpx2
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

import ditf.features.featurizer as featurizer_module
from ditf import DiTFeaturizer
from ditf.errors import InvalidArgumentError, UnknownModelError, UnsupportedLayoutError
from ditf.loading import check_diffusers_version, load_components

IMAGE = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
SETTINGS = dict(prompt="a cat", t=261, ensemble=2, resolution=96)


@pytest.fixture(scope="module")
def full(flux_pipeline_dir):
    return DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), device="cpu")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or connect to a host is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ names that do not resolve
def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"unknown model alias 'flux-devv'\. Did you mean 'flux-dev'.*sd3-medium.*hub id"):
        load_components("flux-devv")


def test_a_folder_that_is_not_a_dit_names_what_it_holds(tmp_path):
    unet_pipeline = tmp_path / "sd15"
    unet_pipeline.mkdir()
    (unet_pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]}))
    with pytest.raises(UnknownModelError, match=r"sd15'? is not a supported DiT: its model_index.json has no transformer "
                                                r"\(unet: UNet2DConditionModel, vae: AutoencoderKL\).*FluxTransformer2DModel"):
        load_components(str(unet_pipeline))
    unet_folder = tmp_path / "unet"
    unet_folder.mkdir()
    (unet_folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UnknownModelError, match=r"its transformer is UNet2DConditionModel.*Supported transformer classes"):
        load_components(str(unet_folder))


# ------------------------------------------------------------------ the hub
def test_offline_hub_id_not_in_the_cache_says_what_to_download(monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if imported before the variable was set
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match=r"'ditf-tests/not-cached' is not \(completely\) in the local Hugging Face cache and "
                                                r"HF_HUB_OFFLINE is set.*`hf download ditf-tests/not-cached`"):
        load_components("ditf-tests/not-cached")
    assert no_network == []


def test_gated_repository_says_which_token_to_set(monkeypatch, no_network):
    import huggingface_hub

    def gated(repo_id, *args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise huggingface_hub.errors.GatedRepoError(f"Access to model {repo_id} is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(UnknownModelError, match=r"'black-forest-labs/FLUX.1-dev' is gated: accept its licence on "
                                                r"https://huggingface.co/black-forest-labs/FLUX.1-dev.*set the HF_TOKEN"):
        load_components("flux-dev")


# ------------------------------------------------------------------ partial loading
@pytest.mark.parametrize("block", [19, 24])
def test_loading_blocks_up_to_k_gives_the_same_features_with_fewer_parameters(flux_pipeline_dir, full, block):
    partial = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), block=block, device="cpu")
    assert torch.equal(partial(IMAGE, block=block, **SETTINGS)[0], full(IMAGE, block=block, **SETTINGS)[0])
    assert n_params(partial.transformer) < n_params(full.transformer)


def test_a_partial_model_holds_exactly_the_blocks_up_to_k_and_the_non_block_modules(flux_pipeline_dir, full):
    block = 24
    partial = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), block=block, device="cpu")
    blocks = [n_params(ref.module) for ref in full.arch.blocks()]
    non_block = n_params(full.transformer) - sum(blocks)  # x/context embedders, time-text embedder, norm_out, proj_out
    assert n_params(partial.transformer) == non_block + sum(blocks[: block + 1])
    with pytest.raises(InvalidArgumentError, match=r"block=28 \(single_transformer_blocks.9\) was not loaded.*block=28"):
        partial(IMAGE, block=28, **SETTINGS)


def test_block_out_of_range_names_the_valid_range(flux_pipeline_dir):
    with pytest.raises(InvalidArgumentError, match=r"block=29 is out of range for FluxTransformer2DModel: valid blocks are 0\.\.28"):
        load_components(str(flux_pipeline_dir), block=29)


# ------------------------------------------------------------------ versions and layouts
class ConcatenatedStreamBlock(FluxSingleTransformerBlock):
    """A single block as diffusers < 0.35 had it: one [txt; img] stream, no `encoder_hidden_states`."""

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        return hidden_states


def test_a_block_with_another_forward_signature_is_refused(flux_pipeline_dir):
    transformer = load_components(str(flux_pipeline_dir / "transformer")).transformer
    old = transformer.single_transformer_blocks[0]
    transformer.single_transformer_blocks[0] = ConcatenatedStreamBlock(old.norm.linear.in_features, 2, 32)
    with pytest.raises(UnsupportedLayoutError, match=r"ConcatenatedStreamBlock.forward takes \('hidden_states', 'temb', "
                                                     r"'image_rotary_emb'\).*expects.*'encoder_hidden_states'.*diffusers"):
        DiTFeaturizer(transformer)


@pytest.mark.parametrize("version", ["0.34.0", "0.43.0", "0.43.0.dev0", "1.0.0"])
def test_unsupported_diffusers_versions_are_refused_with_the_fix(monkeypatch, flux_pipeline_dir, version):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", version)
    with pytest.raises(UnsupportedLayoutError, match=rf"diffusers {version} is installed.*pip install 'diffusers>=0.35,<0.43'"):
        load_components(str(flux_pipeline_dir))


@pytest.mark.parametrize("version", ["0.35.0", "0.42.1", "0.42.2.dev0"])
def test_supported_diffusers_versions_pass(version):
    check_diffusers_version(version)


# ------------------------------------------------------------------ placement
def test_sequential_offload_gives_the_same_features(flux_pipeline_dir, full):
    offloaded = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), offload="sequential", device="cpu")
    assert torch.equal(offloaded(IMAGE, block=24, **SETTINGS)[0], full(IMAGE, block=24, **SETTINGS)[0])


def test_bf16_on_cpu_runs_and_stays_close_to_fp32(flux_pipeline_dir, full):
    """bf16 rounds the timestep (0.261 -> 0.2617) and every block's output; without discard the features stay
    within cosine 0.98 on this tiny model (after discarding its +400 channels the rest is noisier: ~0.93)."""
    bf16 = DiTFeaturizer.from_pretrained(str(flux_pipeline_dir), torch_dtype=torch.bfloat16, block=24, device="cpu")
    assert bf16.dtype == torch.bfloat16
    low, high = (fx(IMAGE, block=24, discard=None, **SETTINGS)[0] for fx in (bf16, full))
    assert low.dtype == torch.float32 and not torch.equal(low, high)
    assert torch.nn.functional.cosine_similarity(low, high, dim=0).min() > 0.98


def test_bf16_on_a_cpu_without_bf16_matmul_is_refused_with_the_fix(monkeypatch):
    def no_bf16(self, other):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_bf16)
    with pytest.raises(InvalidArgumentError, match=r"torch_dtype=torch.bfloat16 cannot run on this CPU.*use torch_dtype=torch.float32"):
        featurizer_module.check_dtype_on_device(torch.bfloat16, torch.device("cpu"))


# ------------------------------------------------------------------ weight variants and the hub cache
def with_fp16_variant(folder, tmp_path):
    """A copy of a transformer folder that also holds `diffusion_pytorch_model.fp16.safetensors`, whose weights are
    the originals doubled (so a test can tell which file was read)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(folder, tmp_path / "transformer")
    weights = load_file(copy / "diffusion_pytorch_model.safetensors")
    save_file({k: (v * 2).half() for k, v in weights.items()}, copy / "diffusion_pytorch_model.fp16.safetensors")
    return copy, weights


def test_a_folder_with_weight_variants_is_read_once_for_the_asked_variant(flux_pipeline_dir, tmp_path):
    from ditf.loading import load_transformer, weight_files

    folder, weights = with_fp16_variant(flux_pipeline_dir / "transformer", tmp_path)
    assert [f.name for f in weight_files(folder)] == ["diffusion_pytorch_model.safetensors"]
    assert [f.name for f in weight_files(folder, "fp16")] == ["diffusion_pytorch_model.fp16.safetensors"]
    key = "transformer_blocks.0.norm1.linear.weight"
    plain = load_transformer(folder, block=20).state_dict()[key]
    doubled = load_transformer(folder, block=20, variant="fp16").state_dict()[key]
    assert torch.equal(plain, weights[key]) and torch.equal(doubled, (weights[key] * 2).half().float())
    with pytest.raises(UnknownModelError, match=r"no diffusion_pytorch_model.bf16.safetensors"):
        weight_files(folder, "bf16")


def test_a_sharded_checkpoint_is_read_through_its_index(flux_pipeline_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from ditf.loading import load_transformer, weight_files

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((flux_pipeline_dir / "transformer" / "config.json").read_bytes())
    weights = load_file(flux_pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    names = sorted(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [f.name for f in weight_files(folder)] == sorted(shards)
    loaded = load_transformer(folder, block=28).state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_a_hub_id_loads_from_the_local_cache_offline(flux_pipeline_dir, tmp_path, monkeypatch, no_network):
    """What `hf download` leaves in the cache (models--owner--name/snapshots/<commit>/...) is found by its hub id."""
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ditf-tests--tiny-flux"
    shutil.copytree(flux_pipeline_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fx = DiTFeaturizer.from_pretrained("ditf-tests/tiny-flux", block=24, device="cpu")
    assert fx.vae is not None and fx.model == "ditf-tests/tiny-flux"
    assert no_network == []
