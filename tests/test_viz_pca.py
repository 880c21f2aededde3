"""PCA pictures of feature maps (ditf.viz.pca) on synthetic maps with planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditf.errors import InvalidArgumentError
from ditf.viz import foreground_mask, pca_rgb, principal_components, save_pca_figure


def two_halves(seed: int, channels: int = 32, h: int = 8, w: int = 10) -> torch.Tensor:
    """(C, h, w) map: cluster A in the left half, cluster B in the right half, plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, channels, generator=torch.Generator().manual_seed(99)) * 3.0
    feats = torch.randn(channels, h, w, generator=generator) * 0.1
    feats[:, :, : w // 2] += centres[0][:, None, None]
    feats[:, :, w // 2 :] += centres[1][:, None, None]
    return feats


def object_on_background(seed: int, channels: int = 32, h: int = 10, w: int = 10) -> torch.Tensor:
    """(C, h, w) map: a background cluster everywhere and an object cluster in the central 4x4 cells,
    the object made of two parts (top and bottom rows of the square) that differ slightly."""
    generator = torch.Generator().manual_seed(seed)
    background, body, part = torch.randn(3, channels, generator=torch.Generator().manual_seed(7)) * 3.0
    feats = torch.randn(channels, h, w, generator=generator) * 0.1 + background[:, None, None]
    feats[:, 3:7, 3:7] += (body - background)[:, None, None]
    feats[:, 3:5, 3:7] += 0.5 * part[:, None, None]
    return feats


def test_first_component_separates_two_planted_clusters():
    picture = pca_rgb([two_halves(0)])[0]
    red = picture[..., 0].astype(int)
    left, right = red[:, :5], red[:, 5:]
    assert {int(left.max()), int(right.min())} == {0, 255} or {int(left.min()), int(right.max())} == {0, 255}
    assert abs(left.mean() - right.mean()) > 200  # the first component is the left/right split
    assert left.std() < 30 and right.std() < 30


def test_output_is_upsampled_uint8_rgb_at_each_requested_size():
    maps = [two_halves(0), two_halves(1, h=6, w=4)]
    pictures = pca_rgb(maps, [(120, 160), (90, 60)])
    assert [p.shape for p in pictures] == [(120, 160, 3), (90, 60, 3)]
    assert all(p.dtype == np.uint8 for p in pictures)
    assert [p.shape for p in pca_rgb(maps)] == [(8, 10, 3), (6, 4, 3)]  # no sizes: the feature grid


def test_components_are_fitted_jointly_so_image_order_does_not_matter():
    first, second, third = two_halves(0), two_halves(1), object_on_background(2)
    forward = pca_rgb([first, second, third], [(40, 50), (40, 50), (50, 50)])
    backward = pca_rgb([third, second, first], [(50, 50), (40, 50), (40, 50)])
    for a, b in zip(forward, backward[::-1]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # equal up to float rounding


def test_joint_fit_gives_the_same_colour_to_the_same_cluster_in_different_images():
    both = two_halves(0)
    left_only = two_halves(1)
    left_only[:, :, 5:] = left_only[:, :, :5]  # an image showing only the left-half cluster
    pictures = pca_rgb([both, left_only])
    red_both, red_left_only = (p[..., 0].astype(int) for p in pictures)  # red: the first component
    assert np.abs(red_left_only - red_both[:, :5].mean()).max() < 20  # the same colour as in the other image


def test_two_calls_are_bit_identical_thanks_to_the_sign_convention():
    maps = [object_on_background(3), two_halves(4)]
    first, second = pca_rgb(maps, [(33, 47), (21, 30)]), pca_rgb(maps, [(33, 47), (21, 30)])
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    directions = principal_components(torch.cat([m.flatten(1).T for m in maps]))
    assert bool((directions.gather(0, directions.abs().argmax(0, keepdim=True)) > 0).all())


def test_foreground_mode_paints_the_planted_background_black():
    maps = [object_on_background(0), object_on_background(1)]
    pictures = pca_rgb(maps, foreground=True)
    for picture in pictures:
        background = np.ones((10, 10), dtype=bool)
        background[3:7, 3:7] = False
        assert (picture[background] == 0).all()
        assert picture[~background].max() > 0
    mask = foreground_mask(maps).reshape(2, 10, 10)
    assert int(mask.sum()) == 2 * 16 and bool(mask[:, 3:7, 3:7].all())
    # Refitted on the object alone, the first component now separates the object's two parts.
    red = pictures[0][..., 0].astype(int)
    assert abs(red[3:5, 3:7].mean() - red[5:7, 3:7].mean()) > 150


def test_more_than_three_components_needed_is_fine_and_tiny_inputs_get_zero_colours():
    single_cell = pca_rgb([torch.randn(16, 1, 1)], [(4, 4)])[0]
    assert single_cell.shape == (4, 4, 3) and (single_cell == 0).all()  # one cell has no variance
    two_channels = pca_rgb([torch.randn(2, 5, 5)])[0]
    assert (two_channels[..., 2] == 0).all() and two_channels[..., 0].max() == 255


def test_bad_inputs_raise_errors_that_name_the_fix():
    with pytest.raises(InvalidArgumentError, match="empty list"):
        pca_rgb([])
    with pytest.raises(InvalidArgumentError, match=r"different channel counts \[32, 16\].*same model"):
        pca_rgb([two_halves(0), torch.randn(16, 4, 4)])
    with pytest.raises(InvalidArgumentError, match=r"list\(feats\)"):
        pca_rgb(torch.randn(2, 8, 4, 4))
    with pytest.raises(InvalidArgumentError, match=r"features\[0\].*\(C, h, w\)"):
        pca_rgb([torch.randn(4, 4)])
    with pytest.raises(InvalidArgumentError, match="one \\(H, W\\) per map"):
        pca_rgb([two_halves(0)], [(10, 10), (10, 10)])
    with pytest.raises(InvalidArgumentError, match="foreground=True"):
        pca_rgb([two_halves(0)], threshold=0.3)
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        pca_rgb([two_halves(0)], foreground=True, threshold=2.0)
    with pytest.raises(InvalidArgumentError, match="finite"):
        pca_rgb([torch.full((4, 3, 3), float("nan"))])


def test_figure_shows_each_image_above_its_picture(tmp_path):
    images = [Image.new("RGB", (50, 40), "white"), Image.new("RGB", (30, 30), "gray")]
    pictures = pca_rgb([two_halves(0), two_halves(1)], [(40, 50), (30, 30)])
    path = save_pca_figure(images, pictures, tmp_path / "pca.png", title="random weights", labels=["a", "b"])
    with Image.open(path) as written:
        assert written.format == "PNG" and written.width > written.height / 2
    with pytest.raises(InvalidArgumentError, match="one picture per image"):
        save_pca_figure(images, pictures[:1], tmp_path / "bad.png")
