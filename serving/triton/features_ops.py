"""Backbone input preparation: resize to a patch-multiple size, normalise; the same for Triton and the trainer.

This file is copied next to the backbone's ``model.py`` into every backbone version (Triton imports it
as ``features_ops``) and is imported as ``serving.triton.features_ops`` by the trainer and the tests,
so served features and the features a head trains on come from the same pixels. It imports only
numpy and Pillow.

Resize rule: the image (decoded in display orientation by ``image_decode``) is scaled so that its long
side becomes ``long_side`` and its short side keeps the aspect ratio; each side is then rounded to the
nearest multiple of the patch size, at least one patch. With a ``long_side`` that is a multiple of the
patch size, the long side is exactly ``long_side``; the aspect ratio moves by at most half a patch.
Resampling is Pillow's bilinear on uint8 RGB, which widens its filter when shrinking (antialiased):
the same filter as transformers' DINOv3 image processor (bilinear, ``antialias=True``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "network_input",
    "prepare",
    "resize_for_backbone",
    "resized_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Array = npt.NDArray[Any]


def resized_size(width: int, height: int, long_side: int, patch: int) -> tuple[int, int]:
    """The (width, height) an image is resized to: long side ``long_side``, both sides patch multiples."""
    if width < 1 or height < 1 or long_side < 1 or patch < 1:
        raise ValueError(f"bad size {width}x{height}, long side {long_side}, patch {patch}")
    scale = long_side / max(width, height)

    def side(n: int) -> int:
        return max(patch, int(round(n * scale / patch)) * patch)

    return side(width), side(height)


def resize_for_backbone(pixels: Array, long_side: int, patch: int) -> Array:
    """RGB uint8 (H, W, 3) pixels resized by the rule above (bilinear, antialiased when shrinking)."""
    height, width = pixels.shape[:2]
    new_w, new_h = resized_size(width, height, long_side, patch)
    if (new_w, new_h) == (width, height):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> Array:
    """(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 v, computed in float32 step by step."""
    values = np.arange(256, dtype=np.float32)[None, :] * np.float32(1 / 255)
    table = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.setflags(write=False)
    return table


def network_input(pixels: Sequence[Array], mean: Sequence[float], std: Sequence[float]) -> Array:
    """Same-size RGB uint8 (H, W, 3) images to the network's float32 (N, 3, H, W), scaled to [0, 1] and normalised.

    Each channel is a lookup in a 256-entry table of the float32 values ``(v * (1/255) - mean) / std``
    would give: the same bits, written once, straight into NCHW (4-6 times faster than the arithmetic).
    """
    batch = np.stack(pixels)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
        raise ValueError(f"expected same-size RGB uint8 (H, W, 3) images, got {batch.dtype} {batch.shape[1:]}")
    table = _normalise_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    n, height, width, _ = batch.shape
    out = np.empty((n, 3, height, width), np.float32)
    for c in range(3):
        np.take(table[c], batch[..., c], out=out[:, c], mode="clip")  # uint8 indices: "clip" never clips
    return out


def prepare(
    pixels: Array, long_side: int, patch: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Array, tuple[int, int]]:
    """One image's network input (1, 3, H, W) and its patch grid (h, w)."""
    resized = resize_for_backbone(pixels, long_side, patch)
    height, width = resized.shape[:2]
    return network_input([resized], mean, std), (height // patch, width // patch)
