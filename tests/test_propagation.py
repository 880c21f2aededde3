"""Label propagation (DINO protocol): neighbourhood mask, one propagation step, whole videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditf.errors import InvalidArgumentError
from ditf.matching.propagation import (
    DITF_DAVIS_PROPAGATION,
    PropagationSettings,
    neighborhood_mask,
    propagate_labels,
    propagate_soft_labels,
    soft_labels_to_label_map,
)


def loop_neighborhood_mask(height: int, width: int, radius: int) -> torch.Tensor:
    """Reference: DINO's `restrict_neighborhood`, one window cell at a time."""
    mask = torch.zeros(height, width, height, width)
    for i in range(height):
        for j in range(width):
            for p in range(2 * radius + 1):
                for q in range(2 * radius + 1):
                    row, col = i - radius + p, j - radius + q
                    if 0 <= row < height and 0 <= col < width:
                        mask[i, j, row, col] = 1
    return mask.reshape(height * width, height * width).bool()


@pytest.mark.parametrize("height, width, radius", [(5, 7, 2), (6, 4, 0), (3, 3, 5), (9, 8, 3)])
def test_neighborhood_mask_equals_loop_reference(height, width, radius):
    assert torch.equal(neighborhood_mask(height, width, radius), loop_neighborhood_mask(height, width, radius))


def reference_step(target, context, labels, allowed, topk, temperature):
    """DINO's `label_propagation` on whole matrices: (C, N), (K, C, N), (K, L, N) -> (L, N)."""
    n_context, _, n = context.shape
    affinity = torch.exp(torch.einsum("cq,kcs->ksq", target, context) / temperature)  # (K, source, query)
    affinity = affinity * allowed.T[None]
    affinity = affinity.reshape(n_context * n, n)
    kth = torch.topk(affinity, dim=0, k=topk).values.min(dim=0).values
    affinity[affinity < kth] = 0
    affinity = affinity / affinity.sum(dim=0, keepdim=True)
    segs = labels.permute(1, 0, 2).reshape(labels.shape[1], n_context * n)
    return segs @ affinity


def test_propagation_step_equals_dense_reference_in_any_chunking():
    generator = torch.Generator().manual_seed(0)
    height, width, channels, n_context, n_labels = 6, 5, 8, 3, 4
    target = F.normalize(torch.randn(channels, height * width, generator=generator), dim=0)
    context = F.normalize(torch.randn(n_context, channels, height * width, generator=generator), dim=1)
    labels = torch.softmax(torch.randn(n_context, n_labels, height * width, generator=generator), dim=1)
    allowed = neighborhood_mask(height, width, 2)
    expected = reference_step(target, context, labels, allowed, topk=5, temperature=0.1)
    for chunk in (None, 1, 7, 1000):
        got = propagate_soft_labels(target, context, labels, allowed, topk=5, temperature=0.1, query_chunk=chunk)
        torch.testing.assert_close(got, expected)
    assert torch.allclose(got.sum(dim=0), torch.ones(height * width))


def test_label_map_normalises_each_label_before_argmax():
    # background is high everywhere, the object weak but peaked: only after min-max scaling does it win
    soft = torch.stack([torch.full((2, 2), 0.9), torch.tensor([[0.0, 0.0], [0.0, 0.5]])])
    soft[0, 1, 1] = 0.8
    label_map = soft_labels_to_label_map(soft, stride=1, output_size=(2, 2))
    assert label_map.tolist() == [[0, 0], [0, 1]]


def test_label_map_is_upsampled_by_the_stride_then_resized_to_the_mask_size():
    soft = torch.zeros(2, 2, 3)
    soft[0] = 1.0
    soft[0, :, 2], soft[1, :, 2] = 0.0, 1.0  # right column is the object
    label_map = soft_labels_to_label_map(soft, stride=4, output_size=(16, 24))
    assert label_map.shape == (16, 24) and label_map.dtype == np.uint8
    assert (label_map[:, :14] == 0).all() and (label_map[:, -6:] == 1).all()


def moving_square_video(n_frames: int, grid: int = 12, size: int = 4):
    """A bright square moving right one cell per frame over noisy dark cells: features, true labels."""
    generator = torch.Generator().manual_seed(1)
    features, labels = [], []
    for t in range(n_frames):
        label = torch.zeros(grid, grid, dtype=torch.long)
        label[4 : 4 + size, 1 + t : 1 + t + size] = 1
        red, blue = torch.tensor([1.0, 0.2, 0.1])[:, None, None], torch.tensor([0.1, 0.3, 1.0])[:, None, None]
        colour = red * label + blue * (1 - label)
        features.append(colour + 0.05 * torch.randn(3, grid, grid, generator=generator))
        labels.append(label.numpy())
    return features, labels


def test_moving_square_is_tracked_at_full_resolution():
    features, labels = moving_square_video(6)
    stride = 4
    first_mask = np.kron(labels[0], np.ones((stride, stride), dtype=np.int64))  # (48, 48)
    predictions = list(propagate_labels(features, first_mask, stride=stride, settings=PropagationSettings(topk=3)))
    assert len(predictions) == 5  # the first frame is not repeated
    for predicted, label in zip(predictions, labels[1:]):
        truth = np.kron(label, np.ones((stride, stride), dtype=np.int64)).astype(bool)
        iou = (truth & (predicted == 1)).sum() / (truth | (predicted == 1)).sum()
        assert iou > 0.9


def drifting_colour_video(n_frames: int):
    """A static object whose feature direction turns from (0, 1) to near the background's (1, 0)."""
    label = torch.zeros(8, 8, dtype=torch.long)
    label[2:6, 2:6] = 1
    background = torch.tensor([1.0, 0.0])
    features = []
    for t in range(n_frames):
        angle = (np.pi / 2) * (1 - 0.85 * t / (n_frames - 1))  # 90 degrees -> 13.5 degrees from background
        obj = torch.tensor([np.cos(angle), np.sin(angle)], dtype=torch.float32)
        features.append(obj[:, None, None] * label + background[:, None, None] * (1 - label))
    return features, label.numpy()


def test_previous_frames_carry_labels_the_first_frame_alone_loses():
    features, label = drifting_colour_video(12)
    with_memory = list(propagate_labels(features, label, stride=1, settings=DITF_DAVIS_PROPAGATION))
    first_only = list(propagate_labels(features, label, stride=1, settings=PropagationSettings(n_last_frames=0)))
    assert (with_memory[-1] == label).all()
    assert (first_only[-1] == 0).all()  # the drifted object now looks like background to frame 0


def test_bad_inputs_are_named():
    features, labels = moving_square_video(2)
    with pytest.raises(InvalidArgumentError, match=r"\[0\]"):
        list(propagate_labels([f[None] for f in features], labels[0], stride=1))
    with pytest.raises(InvalidArgumentError, match="same size"):
        list(propagate_labels([features[0], features[1][:, :6]], labels[0], stride=1))
    with pytest.raises(InvalidArgumentError, match="topk"):
        list(propagate_labels(features, labels[0], stride=1, settings=PropagationSettings(topk=0)))
    with pytest.raises(InvalidArgumentError, match="first_mask"):
        list(propagate_labels(features, labels[0].astype(float), stride=1))
