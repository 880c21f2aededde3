"""Recordings at real-model scale: transport sources keep only their channels (in memory or memory-mapped on disk),
whole-tensor recordings warn with their size first (tiny FLUX pipeline, injected MAs 11 and 42)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import FLUX_TINY_MASSIVE

from ditf.errors import InvalidArgumentError
from ditf.massive import LargeRecordingWarning, Record, Transport, TransportSource, intervene, record_trajectory

INJECTED = FLUX_TINY_MASSIVE
SAMPLING = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt")


def sample_with(pipe, actions, prompt="a cat"):
    with intervene(pipe, actions):
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **SAMPLING).images


def test_a_source_keeps_only_its_channels_at_its_blocks_and_steps(pipe):
    _, source = record_trajectory(pipe, "a dog", blocks="5-20", steps=[1], **SAMPLING)
    assert source.blocks == list(range(5, 21)) and source.steps == [1] and source.branches == ["cond"]
    assert all(source.channels(block, 1, "cond") == INJECTED for block in source.blocks)
    assert source.nbytes == 16 * (1 * 16 * 2) * 4  # 16 blocks x (batch 1, 16 tokens, 2 channels) in fp32
    with pytest.raises(InvalidArgumentError, match=r"no image stream at block 5, step 0"):
        source.values(5, 0, "cond")


def test_a_source_on_disk_is_memory_mapped_and_transports_the_same_image(pipe, tmp_path):
    _, in_memory = record_trajectory(pipe, "a dog", blocks="5-20", **SAMPLING)
    _, on_disk = record_trajectory(pipe, "a dog", blocks="5-20", store=tmp_path / "dog.safetensors", **SAMPLING)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors"]  # no temporary data file left
    reopened = TransportSource.open(tmp_path / "dog.safetensors")
    assert reopened.meta["source"] == {"kind": "prompt", "prompt": "a dog", "seed": 0}
    assert torch.equal(reopened.values(7, 1, "cond"), in_memory.values(7, 1, "cond"))
    from_memory = sample_with(pipe, [Transport(in_memory, blocks="5-20")])
    from_disk = sample_with(pipe, [Transport(reopened, blocks="5-20")])
    assert torch.equal(from_memory, from_disk) and on_disk.store.on_disk


def test_keeping_every_channel_warns_with_the_estimated_size_first(pipe):
    with pytest.warns(LargeRecordingWarning, match=r"a transport source of every channel will keep about 118\.8 kB "
                                                   r"\(29 block x step x branch cells of 4\.1 kB\)"):
        _, source = record_trajectory(pipe, "a dog", blocks="all", steps=[1], channels=None, warn_bytes=1e3,
                                      **SAMPLING)
    assert source.complete and source.nbytes == 29 * 16 * 64 * 4
    with pytest.warns(LargeRecordingWarning, match=r"Record\(full=\['image'\]\) will keep about 237\.6 kB \(58 block"):
        sample_with(pipe, [Record(blocks="all", full=True, warn_bytes=1e3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record_trajectory(pipe, "a dog", blocks="all", **SAMPLING)  # two channels: far below the default 1 GB


def test_a_target_chosen_channel_set_needs_a_source_of_every_channel(pipe):
    _, partial = record_trajectory(pipe, "a dog", blocks=[5], **SAMPLING)
    with pytest.raises(InvalidArgumentError, match="mask_from='target' picks m on the target's stream"):
        Transport(partial, blocks=[5], mask_from="target")
    with pytest.raises(InvalidArgumentError, match="this source keeps only its own channel set m"):
        Transport(partial, blocks=[5], channels="auto", mask_from="target")
    _, complete = record_trajectory(pipe, "a dog", blocks=[5], channels=None, **SAMPLING)
    transport = Transport(complete, blocks=[5], channels="auto", mask_from="target")
    sample_with(pipe, [transport])
    assert {tuple(entry["channels"]) for entry in transport.log} == {tuple(INJECTED)}
