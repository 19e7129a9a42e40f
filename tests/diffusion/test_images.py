"""diffusion.images: pixel-range conversions and image grids."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion.images import (
    image_grid,
    images_to_unit_range,
    save_image_grid,
    to_model_range,
    to_uint8,
)


def test_image_grid_and_png(tmp_path):
    imgs = torch.stack([torch.full((1, 8, 8), v) for v in (-1.0, 0.0, 1.0, 2.0, -5.0)])
    grid = image_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 10, 0] == 128 and grid[1, 19, 0] == 255
    assert grid[10, 10, 0] == 0  # values outside [-1, 1] are clipped
    path = save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3, scale=4)
    with Image.open(path) as im:
        assert im.size == (4 * 28, 4 * 19) and im.mode == "L"
    rgb = save_image_grid(torch.zeros(4, 3, 5, 5), tmp_path / "rgb.png")
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (13, 13)


def test_every_uint8_value_round_trips_through_the_model_range():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), pixels)
    assert torch.equal(to_model_range(pixels.numpy()), x)  # numpy arrays too


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_to_uint8_is_the_nearest_pixel_of_the_clipped_value(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = to_uint8(x)
    assert got.dtype == torch.uint8
    # the returned pixel's bin centre is the closest to the clipped value (within rounding)
    centres = to_model_range(got).double()
    clipped = x.double().clamp(-1, 1)
    assert ((centres - clipped).abs() <= 1 / 255 + 1e-6).all()


def test_unit_range_of_uint8_and_model_range_images_agree():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    from_uint8 = images_to_unit_range(pixels)
    from_float = images_to_unit_range(to_model_range(pixels))
    assert from_uint8.dtype == torch.float32 and from_uint8.min() == 0 and from_uint8.max() == 1
    torch.testing.assert_close(from_float, from_uint8, rtol=0, atol=1e-6)
    assert images_to_unit_range(np.zeros((1, 1, 2, 2), np.uint8)).shape == (1, 1, 2, 2)


def test_unit_range_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"expected shape \[N, C, H, W\]"):
        images_to_unit_range(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="uint8 or floating point"):
        images_to_unit_range(torch.zeros(1, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        images_to_unit_range(torch.full((1, 1, 2, 2), 255.0))
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(torch.zeros(1, 1, 2, 2))


def test_image_grid_rejects_non_batches():
    with pytest.raises(ValueError, match=r"expected \[N, C, H, W\]"):
        image_grid(torch.zeros(3, 4, 4))
