"""Pixel boxes become Label Studio's percent rectangles (top-left origin) and back."""

from __future__ import annotations

import pytest

from ls_bridge.geometry import PercentBox, PixelBox, percent_to_pixels, pixels_to_percent


def test_pixels_to_percent_uses_top_left_corner_and_size() -> None:
    box = pixels_to_percent(PixelBox(64, 48, 192, 144), 640, 480)
    assert box == pytest.approx(PercentBox(x=10.0, y=10.0, width=20.0, height=20.0))


def test_boxes_are_clipped_to_the_image() -> None:
    box = pixels_to_percent(PixelBox(-10, -5, 700, 240), 640, 480)
    assert box == pytest.approx(PercentBox(x=0.0, y=0.0, width=100.0, height=50.0))


def test_swapped_corners_are_ordered() -> None:
    assert pixels_to_percent(PixelBox(192, 144, 64, 48), 640, 480) == pytest.approx((10.0, 10.0, 20.0, 20.0))


def test_round_trip_on_a_non_square_image() -> None:
    original = PixelBox(12.5, 7.25, 300.75, 199.0)
    back = percent_to_pixels(pixels_to_percent(original, 333, 201), 333, 201)
    assert back == pytest.approx(original, abs=1e-9)


def test_zero_sized_image_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        pixels_to_percent(PixelBox(0, 0, 1, 1), 0, 10)
