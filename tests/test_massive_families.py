"""`intervene` during real diffusers pipeline calls of every supported family (tiny random pipelines, 2 steps).

Each family's pipeline is saved, loaded back and sampled at 64x64 px with injected massive channels:
once untouched, once recorded at every block, step and branch, and with edits. The checks are the same
for all families; only how a family is built and called differs (`FAMILIES`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_dit import build_dit_pipeline
from tiny_flux2 import build_flux2_pipeline
from tiny_models import flux_pipeline, leftover_hooks
from tiny_pixart import build_pixart_pipeline
from tiny_qwen_image import build_qwen_image_pipeline
from tiny_sana import build_sana_pipeline
from tiny_sd3 import build_sd3_pipeline

from ditf.arch import arch_for
from ditf.errors import UnsupportedLayoutError
from ditf.massive import RatioRule, Record, Scale, Zero, detect_table, intervene

MASSIVE = (3, 7)
"""Channels the builders make massive (the FLUX fixture's own are 11 and 42)."""
POINTS = ("image", "output", "shift", "scale", "gate")
STEPS = [0, 1]


def build_flux2_with_massive_channels(folder: Path, variant: str, massive_channels: Sequence[int] = MASSIVE) -> Path:
    """A tiny FLUX.2 pipeline whose image embedding makes `massive_channels` ~1000x larger than the others.

    `x_embedder` has no bias, so its weight rows for those channels are scaled instead.
    """
    from diffusers import Flux2Transformer2DModel

    build_flux2_pipeline(folder, variant=variant)
    transformer = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    with torch.no_grad():
        transformer.x_embedder.weight[list(massive_channels)] *= 1000.0
    transformer.save_pretrained(folder / "transformer")
    return folder


@dataclass(frozen=True)
class Family:
    """How to build and call one family's tiny pipeline, and what its run looks like."""

    name: str
    pipeline_class: str
    build: Callable[[Path], Path]
    call: dict[str, Any]
    branches: list[str]
    """CFG branches the call runs."""
    massive: tuple[int, ...] = MASSIVE
    text_stream: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"height": 64, "width": 64})


FAMILIES = [
    Family("flux", "FluxPipeline", flux_pipeline, {"prompt": "a cat", "max_sequence_length": 8}, ["cond"],
           massive=(11, 42)),
    Family("sd3", "StableDiffusion3Pipeline", partial(build_sd3_pipeline, massive_channels=MASSIVE),
           {"prompt": "a cat"}, ["cond", "uncond"]),
    Family("pixart-sigma", "PixArtSigmaPipeline", partial(build_pixart_pipeline, sigma=True, massive_channels=MASSIVE),
           {"prompt": "a cat", "use_resolution_binning": False, "clean_caption": False}, ["cond", "uncond"],
           text_stream=False),
    Family("pixart-alpha-512", "PixArtAlphaPipeline",
           partial(build_pixart_pipeline, additional_conditions=False, massive_channels=MASSIVE),
           {"prompt": "a cat", "use_resolution_binning": False, "clean_caption": False}, ["cond", "uncond"],
           text_stream=False),
    Family("dit", "DiTPipeline", partial(build_dit_pipeline, massive_channels=MASSIVE),
           {"class_labels": [1], "guidance_scale": 1.0}, ["cond"], text_stream=False, size={}),
    Family("sana", "SanaPipeline", partial(build_sana_pipeline, massive_channels=MASSIVE),
           {"prompt": "a photo of a cat", "use_resolution_binning": False}, ["cond", "uncond"], text_stream=False),
    Family("qwen-image", "QwenImagePipeline", partial(build_qwen_image_pipeline, massive_channels=MASSIVE),
           {"prompt": "a photo of a cat", "negative_prompt": "blurry", "true_cfg_scale": 2.0}, ["cond", "uncond"]),
    Family("flux2-dev", "Flux2Pipeline", partial(build_flux2_with_massive_channels, variant="dev"),
           {"prompt": "a photo of a cat"}, ["cond"]),
    Family("flux2-klein", "Flux2KleinPipeline", partial(build_flux2_with_massive_channels, variant="klein"),
           {"prompt": "a photo of a cat"}, ["cond", "uncond"]),
]


@dataclass
class Sampler:
    """A loaded tiny pipeline of one family, sampled with a fixed seed."""

    family: Family
    pipe: Any

    def __call__(self, actions: Sequence[Any] = ()) -> torch.Tensor:
        """The generated images (B, 3, H, W), with `actions` hooked in when given; checks no hook is left."""
        settings = {**self.family.call, **self.family.size, "num_inference_steps": len(STEPS), "output_type": "pt"}
        with intervene(self.pipe, actions):
            images = self.pipe(generator=torch.Generator().manual_seed(0), **settings).images
        assert leftover_hooks(self.pipe.transformer) == []
        return images

    @property
    def num_blocks(self) -> int:
        return arch_for(self.pipe.transformer).num_blocks()


@pytest.fixture(scope="module", params=FAMILIES, ids=[family.name for family in FAMILIES])
def sampler(request, tmp_path_factory) -> Sampler:
    import diffusers

    family: Family = request.param
    folder = family.build(tmp_path_factory.mktemp(family.name) / "pipeline")
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return Sampler(family, pipe)


@pytest.fixture(scope="module")
def baseline(sampler) -> torch.Tensor:
    return sampler()


@pytest.fixture(scope="module")
def recorded(sampler):
    """(images, recording) of a run recorded at every block, step and branch, with whole stream tensors."""
    record = Record(points=POINTS, branch="all", full=("image", "output"))
    return sampler([record]), record.recording


def test_recording_every_block_step_and_branch_leaves_the_output_bit_identical(sampler, baseline, recorded):
    images, recording = recorded
    assert torch.equal(images, baseline)
    blocks = list(range(sampler.num_blocks))
    assert recording.branches == sampler.family.branches
    for branch in sampler.family.branches:
        for point in ("image", "output"):
            table = recording.table(point, branch)
            assert table.blocks == blocks and table.steps == STEPS
        keys = {(point, k, step) for point, k, step, b in recording.tensors if b == branch}
        assert keys == {(point, k, step) for point in POINTS for k in blocks for step in STEPS}


def test_every_block_output_is_the_next_blocks_input(sampler, recorded):
    _, recording = recorded
    last = sampler.num_blocks - 1
    for branch in sampler.family.branches:
        for step in STEPS:
            for k in range(last):
                leaving = recording.tensor("output", k, step, branch)
                assert torch.equal(leaving, recording.tensor("image", k + 1, step, branch))
            image, output = (recording.tensor(point, last, step, branch) for point in ("image", "output"))
            assert output.shape == image.shape and not torch.equal(output, image)


def test_the_injected_channels_are_massive_in_the_recorded_stream(sampler, recorded):
    _, recording = recorded
    detected = detect_table(recording.table("image", "cond"), RatioRule())
    assert detected[(0, 0)] == list(sampler.family.massive)


def test_scaling_every_channel_by_one_reproduces_the_output_bit_for_bit(sampler, baseline):
    edits = [Scale(1.0, channels="all")]
    if sampler.family.text_stream:
        edits.append(Scale(1.0, channels="all", tokens="text"))
    assert torch.equal(sampler(edits), baseline)
    calls = sampler.num_blocks * len(STEPS) * len(sampler.family.branches)
    assert [edit.applied for edit in edits] == [calls] * len(edits)


def test_zeroing_the_injected_massive_channels_changes_the_output(sampler, baseline):
    zero = Zero(channels=sampler.family.massive)
    assert (sampler([zero]) - baseline).abs().max() > 1e-3
    assert {tuple(entry["channels"]) for entry in zero.log} == {sampler.family.massive}


def test_a_text_stream_edit_reaches_the_last_block(sampler, baseline):
    if not sampler.family.text_stream:
        pytest.skip(f"{sampler.family.name} has no text residual stream")
    seen = Record(points=("text",), blocks="last", steps="last", full=True)
    images = sampler([Zero(channels="all", tokens="text", blocks="last"), seen])
    assert torch.all(seen.recording.tensor("text", sampler.num_blocks - 1, STEPS[-1]) == 0)
    assert not torch.equal(images, baseline)


def test_a_later_block_with_an_unknown_forward_signature_is_refused(sampler):
    transformer = sampler.pipe.transformer
    arch = arch_for(transformer)
    last = arch.block(-1)
    last.module.forward = lambda x, conditioning: x
    try:
        with pytest.raises(UnsupportedLayoutError, match=rf"forward takes \('x', 'conditioning'\) \(at {last.path}\)"):
            arch_for(transformer)
    finally:
        del last.module.forward
