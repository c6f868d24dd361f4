"""Image bytes to RGB pixels, the same for every model kind, the trainer and the evaluator.

Copied next to ``model.py`` into every model version (Triton imports it as ``image_decode``), so it
imports only numpy, Pillow and OpenCV: nothing of the project. What it handles: EXIF orientation,
grey, palette, RGBA and 16-bit images, and limits on encoded bytes and decoded pixels.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Decoded", "ImageRejected", "Pixels", "decode_image", "fitted_size"]

Pixels = npt.NDArray[Any]  # uint8, height x width x 3, RGB

# Pillow reads its bomb limit (``Image.MAX_IMAGE_PIXELS``) from a module global at each check.
_PILLOW_LIMIT = threading.Lock()

_EXIF_ORIENTATION = 0x0112
# OpenCV decodes these faster than Pillow (same libjpeg-turbo, less overhead). Its PNG decode measured
# slower than Pillow's, and other JPEG modes (CMYK) keep Pillow's conversion.
_OPENCV_FORMATS = ("JPEG", "MPO")
_OPENCV_MODES = ("RGB", "L")
# DCT scale-down factor -> imdecode flags; OpenCV's own EXIF handling is off, Pillow's reading is used.
_JPEG_FLAGS = {
    1: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}
# ``ImageOps.exif_transpose``'s transform per EXIF orientation, done on an array.
_ORIENT: dict[int, Callable[[Pixels], Pixels]] = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


class ImageRejected(ValueError):
    """An input image cannot be decoded or breaks a limit (maps to a per-request error)."""


@dataclass(frozen=True)
class Decoded:
    """Decoded RGB pixels and the image's full display-orientation size.

    ``pixels`` may be a reduced JPEG decode (opt-in: ``decode_image(..., target=...)``); boxes must
    still come back in ``width`` x ``height``, the pixels of the image the client sent.
    """

    pixels: Pixels
    width: int
    height: int


def decode_image(data: bytes, max_bytes: int, max_pixels: int, target: tuple[int, int] | None = None) -> Decoded:
    """Decode bytes to RGB uint8 pixels in display orientation (EXIF applied).

    Images over ``max_pixels`` are refused from the header, before any pixel is allocated and before
    Pillow's own bomb check can warn or raise; Pillow's guard then applies to the decode, raised to
    ``max_pixels`` where that is higher. JPEGs are decoded by OpenCV, which is faster than Pillow.

    ``target`` (network input height, width) opts in to a reduced JPEG decode (the
    ``fast_jpeg_decode`` setting): a large JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the DCT,
    a fraction of the cost, never below what the letterbox needs, but not the pixels a full decode
    gives (what the trainer and ultralytics see): scores move. Pass ``Decoded.width``/``height`` to
    ``letterbox`` as ``orig``. Other formats, and JPEGs OpenCV cannot decode, go through Pillow.
    """
    if not data:
        raise ImageRejected("empty image")
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, limit {max_bytes}")
    try:
        with _pillow_limit(None):
            im = Image.open(io.BytesIO(data))  # the header only: no pixels yet
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageRejected(
                    f"image is {w}x{h} pixels, limit {max_pixels} (max_image_pixels): refused unread, "
                    "as a possible decompression bomb"
                )
            if im.format in _OPENCV_FORMATS and im.mode in _OPENCV_MODES:
                # Pillow reads the orientation (EXIF, else XMP) from the header as exif_transpose does.
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                width, height = (h, w) if orientation in _TRANSPOSED else (w, h)
                factor = 1 if target is None else _jpeg_reduction(width, height, target)
                pixels = _decode_opencv(data, _JPEG_FLAGS[factor], orientation)
                if pixels is not None:
                    return Decoded(pixels, width, height)
            with _pillow_limit(max_pixels, floor=True):
                pixels = _decode_pillow(im)
            return Decoded(pixels, pixels.shape[1], pixels.shape[0])
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:  # a frame or tile past Pillow's limit, inside the image
        raise ImageRejected(f"image refused as a possible decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(f"cannot decode image: {exc}") from exc


@contextmanager
def _pillow_limit(pixels: int | None, floor: bool = False) -> Iterator[None]:
    """Pillow's bomb limit for one step of a decode, put back after it (nothing else changes it here).

    ``None`` lifts it while the header is read, so our cap and message come first; ``floor`` raises
    it to ``pixels`` only where Pillow's is lower, so an image our cap allows decodes without
    Pillow's warning (an error under ``-W error``) while Pillow's guard still holds above both.
    """
    with _PILLOW_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        if floor and (saved is None or pixels is None or saved >= pixels):
            pixels = saved
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _jpeg_reduction(width: int, height: int, target: tuple[int, int]) -> int:
    """Largest JPEG scale-down (8, 4, 2) whose output is still no smaller than the letterbox's resize."""
    new_w, new_h = fitted_size(width, height, target)
    for factor in (8, 4, 2):
        # libjpeg's scaled output is ceil(size / factor)
        if -(-width // factor) >= new_w and -(-height // factor) >= new_h:
            return factor
    return 1


def _decode_opencv(data: bytes, flags: int, orientation: int) -> Pixels | None:
    """OpenCV decode to RGB, turned as ``exif_transpose`` would; None where OpenCV cannot decode it."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        return None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    turn = _ORIENT.get(orientation)
    return rgb if turn is None else turn(rgb)


def _decode_pillow(im: Image.Image) -> Pixels:
    """Pillow decode of any format it reads, to RGB in display orientation."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        # Pillow's 16-bit grey -> RGB clips at 255; keep the high byte, as it does for 16-bit RGB.
        im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def fitted_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The letterbox's resized (width, height) of an image fitted into ``size`` (height, width)."""
    r = min(size[0] / height, size[1] / width)
    return max(round(width * r), 1), max(round(height * r), 1)
