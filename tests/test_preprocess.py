"""Every kind of image input becomes the right RGB pixels at the right size."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditf.errors import ImageError
from ditf.features.preprocess import load_image, prepare_image, target_size


def test_long_side_goes_to_resolution_and_sides_round_to_the_stride():
    assert target_size((375, 500), 640, 16) == (480, 640)
    assert target_size((333, 500), 640, 16) == (432, 640)  # 426.2 -> 27 patches
    prepared = prepare_image(np.zeros((375, 500, 3), np.uint8), stride=16, resolution=640)
    assert prepared.pixels.shape == (1, 3, 480, 640) and prepared.original_size == (375, 500)


def test_pixels_are_in_minus_one_one():
    white = prepare_image(np.full((32, 32, 3), 255, np.uint8), stride=16, resolution=32).pixels
    black = prepare_image(np.zeros((32, 32, 3), np.uint8), stride=16, resolution=32).pixels
    assert white.eq(1).all() and black.eq(-1).all()


def test_square_padding_keeps_the_image_top_left():
    prepared = prepare_image(np.full((16, 32, 3), 255, np.uint8), stride=16, resolution=64, pad_square=True)
    assert prepared.pixels.shape == (1, 3, 64, 64) and prepared.resized_size == (32, 64)
    assert prepared.pixels[..., :32, :].eq(1).all() and prepared.pixels[..., 32:, :].eq(-1).all()


def test_grayscale_rgba_and_16_bit_inputs(tmp_path):
    gray = Image.fromarray(np.full((20, 20), 128, np.uint8), mode="L")
    assert np.asarray(load_image(gray))[0, 0].tolist() == [128, 128, 128]
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255  # top half opaque red, bottom transparent -> white
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [255, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    deep = Image.fromarray(np.full((20, 20), 65535 // 2, np.uint16))
    deep.save(tmp_path / "deep.png")
    assert np.asarray(load_image(tmp_path / "deep.png"))[0, 0].tolist() == [127, 127, 127]
    tensor = torch.full((3, 20, 20), 0.5)
    assert np.asarray(load_image(tensor))[0, 0].tolist() == [128, 128, 128]


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 30)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="nothere.jpg.*does not exist"):
        load_image(tmp_path / "nothere.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg.*corrupt"):
        load_image(tmp_path / "broken.jpg")


def test_image_smaller_than_one_patch_is_refused():
    with pytest.raises(ImageError, match="smaller than one 16-pixel patch"):
        prepare_image(np.zeros((8, 40, 3), np.uint8), stride=16, resolution=640)
