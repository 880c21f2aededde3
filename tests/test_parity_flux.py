"""Our extractor is the same function as the DiTF authors' code on the flux_tiny reference case."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from ditf import DiTFeaturizer
from ditf.features.postprocess import ditf_features
from ditf.loading import load_transformer
from tiny_models import FLUX_TINY, REFERENCE_TOLERANCE, reference_error

CASE = load_file(FLUX_TINY / "flux_tiny_case.safetensors")
META = json.loads((FLUX_TINY / "flux_tiny_case.json").read_text())


def extract_with(fx: DiTFeaturizer, block: int, discard, **options):
    return fx.from_latents(CASE["latents"], CASE["noise"], prompt_embeds=CASE["txt"], pooled_prompt_embeds=CASE["pooled"],
                           t=META["t"] * 1000, block=block, guidance=META["guidance"], discard=discard, return_parts=True,
                           **options)


def extract(fx: DiTFeaturizer, block: int, discard):
    return extract_with(fx, block, discard)


@pytest.fixture(scope="module")
def featurizer():
    return DiTFeaturizer(FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer"))


@pytest.mark.parametrize("block", META["blocks"])
def test_raw_features_and_modulation_equal_the_reference(featurizer, block):
    result = extract(featurizer, block, discard=None)
    assert reference_error(result.raw, CASE[f"k{block}_raw"]) <= REFERENCE_TOLERANCE
    for part in ("shift", "scale", "gate"):
        assert reference_error(getattr(result, part), CASE[f"k{block}_{part}"]) <= REFERENCE_TOLERANCE
    assert reference_error(result.features, CASE[f"k{block}_ditf"]) <= REFERENCE_TOLERANCE


@pytest.mark.parametrize("block", META["blocks"])
@pytest.mark.parametrize("discard", [META["massive_channels"], "auto"])
def test_channel_discard_equals_the_reference(featurizer, block, discard):
    result = extract(featurizer, block, discard)
    assert result.discarded == META["massive_channels"]
    assert reference_error(result.features, CASE[f"k{block}_ditf_cd"]) <= REFERENCE_TOLERANCE


def test_discard_matters_on_this_case(featurizer):
    """Guard against a vacuous parity check: with and without discard the references differ."""
    block = META["blocks"][-1]
    assert (CASE[f"k{block}_ditf"] - CASE[f"k{block}_ditf_cd"]).abs().max() > 0.1
    assert (extract(featurizer, block, None).features - extract(featurizer, block, "auto").features).abs().max() > 0.1


@pytest.mark.parametrize("block", META["blocks"])
def test_loading_only_blocks_up_to_k_gives_the_same_features(block):
    partial = DiTFeaturizer(load_transformer(FLUX_TINY / "diffusers_transformer", block=block))
    assert reference_error(extract(partial, block, "auto").features, CASE[f"k{block}_ditf_cd"]) <= REFERENCE_TOLERANCE
    full = FluxTransformer2DModel.from_pretrained(FLUX_TINY / "diffusers_transformer")
    later_blocks = [ref.module for ref in DiTFeaturizer(full).arch.blocks()[block + 1 :]]
    skipped = sum(p.numel() for module in later_blocks for p in module.parameters())
    loaded = sum(p.numel() for p in partial.transformer.parameters())
    assert loaded == sum(p.numel() for p in full.parameters()) - skipped


def test_ensemble_is_averaged_before_normalisation(featurizer):
    """raw(ensemble of 2) = mean of the raws of each member; LayerNorm comes after the mean."""
    block = META["blocks"][0]
    both = extract(featurizer, block, None)
    members = [featurizer.from_latents(CASE["latents"], CASE["noise"][i : i + 1], prompt_embeds=CASE["txt"],
                                       pooled_prompt_embeds=CASE["pooled"], t=META["t"] * 1000, block=block,
                                       guidance=META["guidance"], return_parts=True) for i in range(2)]
    assert torch.allclose(both.raw, (members[0].raw + members[1].raw) / 2, atol=1e-5)
    mean_raw = both.raw.permute(1, 2, 0)
    expected = ditf_features(mean_raw, both.shift, both.scale).permute(2, 0, 1)
    assert torch.allclose(both.features, expected, atol=1e-5)


def test_max_batch_does_not_change_the_result(featurizer):
    block = META["blocks"][1]
    one_at_a_time = featurizer.from_latents(CASE["latents"], CASE["noise"], prompt_embeds=CASE["txt"],
                                            pooled_prompt_embeds=CASE["pooled"], t=META["t"] * 1000, block=block,
                                            guidance=META["guidance"], discard=None, max_batch=1)
    assert reference_error(one_at_a_time.features, CASE[f"k{block}_ditf"]) <= REFERENCE_TOLERANCE


def test_auto_detection_threshold_is_configurable(featurizer):
    block = META["blocks"][-1]
    strict = extract_with(featurizer, block, "auto", massive_ratio=1e6)
    assert strict.discarded == [] and reference_error(strict.features, CASE[f"k{block}_ditf"]) <= REFERENCE_TOLERANCE


def test_all_reference_blocks_from_one_pass_equal_the_reference_and_single_block_calls(featurizer):
    several = extract(featurizer, META["blocks"], "auto")
    for block in META["blocks"]:
        assert reference_error(several[block].features, CASE[f"k{block}_ditf_cd"]) <= REFERENCE_TOLERANCE
        assert torch.equal(several[block].features, extract(featurizer, block, "auto").features)
        assert torch.equal(several[block].shift, extract(featurizer, block, "auto").shift)
