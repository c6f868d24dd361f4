"""Pure conversions between pixel boxes and Label Studio's percent rectangles.

Label Studio stores a rectangle as its top-left corner plus width and height, all in percent
of the displayed image (EXIF orientation applied), so the same numbers hold at any zoom.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["PercentBox", "PixelBox", "percent_to_pixels", "pixels_to_percent"]


class PercentBox(NamedTuple):
    """Label Studio's ``value.x/y/width/height``: top-left corner and size, percent of the image."""

    x: float
    y: float
    width: float
    height: float


class PixelBox(NamedTuple):
    """Corner coordinates in pixels of the displayed image."""

    x1: float
    y1: float
    x2: float
    y2: float


def _clip(value: float, high: float) -> float:
    return min(max(value, 0.0), high)


def pixels_to_percent(box: PixelBox, image_width: int, image_height: int) -> PercentBox:
    """Clip a pixel box to the image and express it the way Label Studio stores it."""
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    x1, x2 = sorted((_clip(box.x1, image_width), _clip(box.x2, image_width)))
    y1, y2 = sorted((_clip(box.y1, image_height), _clip(box.y2, image_height)))
    return PercentBox(
        x=100.0 * x1 / image_width,
        y=100.0 * y1 / image_height,
        width=100.0 * (x2 - x1) / image_width,
        height=100.0 * (y2 - y1) / image_height,
    )


def percent_to_pixels(box: PercentBox, image_width: int, image_height: int) -> PixelBox:
    """Back from Label Studio's percent rectangle to pixel corners (for exports and checks)."""
    x1 = box.x * image_width / 100.0
    y1 = box.y * image_height / 100.0
    return PixelBox(
        x1=x1,
        y1=y1,
        x2=x1 + box.width * image_width / 100.0,
        y2=y1 + box.height * image_height / 100.0,
    )
