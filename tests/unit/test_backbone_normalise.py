"""``features_ops.network_input``: the lookup-table normalise gives the bits of the arithmetic it replaced."""

from __future__ import annotations

import numpy as np
import pytest

from serving.triton.features_ops import IMAGENET_MEAN, IMAGENET_STD, network_input


def _arithmetic(pixels: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The float32 steps network_input used to take, one by one."""
    batch = np.stack(pixels).astype(np.float32) * np.float32(1 / 255)
    batch -= np.asarray(mean, np.float32)
    batch /= np.asarray(std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("mean", "std"),
    [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)), ((0.0, 0.1, 0.9), (1.0, 0.3, 2.0))],
)
@pytest.mark.parametrize("count", [1, 3])
def test_the_table_gives_the_same_bits_as_the_arithmetic(
    mean: tuple[float, ...], std: tuple[float, ...], count: int
) -> None:
    rng = np.random.default_rng(count)
    pixels = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(count)]
    pixels[0][0, :, :] = np.arange(240, dtype=np.uint8).reshape(80, 3)  # plenty of the 256 values in one row
    pixels[0][1, :16, :] = np.arange(240, 256, dtype=np.uint8)[:, None]
    got = network_input(pixels, mean, std)
    assert got.dtype == np.float32 and got.shape == (count, 3, 48, 80) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _arithmetic(pixels, mean, std))


def test_a_strided_view_is_read_as_its_pixels() -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    view = big[::2, 1::3]
    np.testing.assert_array_equal(
        network_input([view], IMAGENET_MEAN, IMAGENET_STD), _arithmetic([view], IMAGENET_MEAN, IMAGENET_STD)
    )


@pytest.mark.parametrize(
    "pixels", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)]
)
def test_anything_but_rgb_uint8_is_refused(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        network_input([pixels], IMAGENET_MEAN, IMAGENET_STD)
