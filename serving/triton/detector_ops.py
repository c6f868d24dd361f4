"""Pre- and post-processing of the Triton detector, as ultralytics does it.

This file is copied next to ``model.py`` into every model version, so a version folder is
self-contained and runs on any Triton with the python backend (this machine, NVIDIA's
container, a Jetson). It imports only numpy, Pillow and OpenCV.
"""

from __future__ import annotations

import ast
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "Decoded",
    "DetectorMeta",
    "ImageRejected",
    "Letterbox",
    "decode_image",
    "letterbox",
    "letterbox_stride",
    "network_input",
    "nms",
    "parse_onnx_metadata",
    "postprocess",
]

PAD_VALUE = 114
MAX_WH = 7680  # class offset for class-aware NMS, as ultralytics

# Pillow's own bomb guard would warn first; ours is the explicit limit.
Image.MAX_IMAGE_PIXELS = None

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
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
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
class DetectorMeta:
    """What a version says about itself: class names and input size."""

    names: tuple[str, ...]
    imgsz: tuple[int, int]
    stride: int


@dataclass(frozen=True)
class Decoded:
    """Decoded RGB pixels and the image's full display-orientation size.

    ``pixels`` may be a reduced JPEG decode (``decode_image(..., target=...)``); boxes must still come
    back in ``width`` x ``height``, the pixels of the image the client sent.
    """

    pixels: np.ndarray
    width: int
    height: int


@dataclass(frozen=True)
class Letterbox:
    """How an original image was placed into the network input."""

    orig_w: int
    orig_h: int
    new_w: int
    new_h: int
    left: int
    top: int


def parse_onnx_metadata(custom: dict[str, str]) -> DetectorMeta:
    """Read ultralytics' export metadata (names, imgsz, stride) from the ONNX file."""
    if "names" not in custom or "imgsz" not in custom:
        raise ValueError("ONNX metadata has no 'names'/'imgsz': export it with ultralytics / labelloop export")
    names_map = ast.literal_eval(custom["names"])
    names = tuple(str(names_map[i]) for i in sorted(names_map))
    imgsz = ast.literal_eval(custom["imgsz"])
    size = (int(imgsz[0]), int(imgsz[1])) if isinstance(imgsz, (list, tuple)) else (int(imgsz), int(imgsz))
    return DetectorMeta(names=names, imgsz=size, stride=int(custom.get("stride", 32)))


def decode_image(data: bytes, max_bytes: int, max_pixels: int, target: tuple[int, int] | None = None) -> Decoded:
    """Decode bytes to RGB uint8 pixels in display orientation (EXIF applied).

    JPEGs are decoded by OpenCV, which is faster than Pillow. With ``target`` (network input height,
    width) a large JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the DCT, a fraction of the cost of
    a full decode, and never below what the letterbox needs: pass ``Decoded.width``/``height`` to
    ``letterbox`` as ``orig``. Other formats, and JPEGs OpenCV cannot decode, go through Pillow.
    """
    if not data:
        raise ImageRejected("empty image")
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, limit {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            # The header is read without decoding: refuse bombs before allocating pixels.
            w, h = im.size
            if w * h > max_pixels:
                raise ImageRejected(f"image is {w}x{h} pixels, limit {max_pixels}")
            if im.format in _OPENCV_FORMATS and im.mode in _OPENCV_MODES:
                # Pillow reads the orientation (EXIF, else XMP) from the header as exif_transpose does.
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                width, height = (h, w) if orientation in _TRANSPOSED else (w, h)
                factor = 1 if target is None else _jpeg_reduction(width, height, target)
                pixels = _decode_opencv(data, _JPEG_FLAGS[factor], orientation)
                if pixels is not None:
                    return Decoded(pixels, width, height)
            pixels = _decode_pillow(im)
            return Decoded(pixels, pixels.shape[1], pixels.shape[0])
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(f"cannot decode image: {exc}") from exc


def _jpeg_reduction(width: int, height: int, target: tuple[int, int]) -> int:
    """Largest JPEG scale-down (8, 4, 2) whose output is still no smaller than the letterbox's resize."""
    new_w, new_h = _resized(width, height, target)
    for factor in (8, 4, 2):
        # libjpeg's scaled output is ceil(size / factor)
        if -(-width // factor) >= new_w and -(-height // factor) >= new_h:
            return factor
    return 1


def _decode_opencv(data: bytes, flags: int, orientation: int) -> np.ndarray | None:
    """OpenCV decode to RGB, turned as ``exif_transpose`` would; None where OpenCV cannot decode it."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        return None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    turn = _ORIENT.get(orientation)
    return rgb if turn is None else turn(rgb)


def _decode_pillow(im: Image.Image) -> np.ndarray:
    """Pillow decode of any format it reads, to RGB in display orientation."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        # Pillow's 16-bit grey -> RGB clips at 255; keep the high byte, as it does for 16-bit RGB.
        im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _resized(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The letterbox's resized (width, height) of an image fitted into ``size`` (height, width)."""
    r = min(size[0] / height, size[1] / width)
    return max(round(width * r), 1), max(round(height * r), 1)


def letterbox_stride(input_shape: Sequence[object], meta: DetectorMeta, rect: bool) -> int | None:
    """The stride to pad a minimum rectangle to, or None for the full ``imgsz`` square.

    A rectangle needs a network whose height and width are dynamic (``labelloop export`` writes
    them so); a fixed-size ONNX always gets the square it was exported for.
    """
    dynamic = not all(isinstance(d, int) for d in input_shape[2:4])
    return meta.stride if rect and dynamic else None


def letterbox(
    img: np.ndarray, size: tuple[int, int], orig: tuple[int, int] | None = None, stride: int | None = None
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad with grey 114, centred (ultralytics ``LetterBox``).

    ``orig`` (width, height) is the full size when ``img`` is a reduced decode of the image: placement
    is computed from it, so the image lands exactly where the full decode would, and ``postprocess``
    maps boxes back to full-size pixels. With ``stride`` the padding stops at the next multiple of it
    (ultralytics' ``auto``, what its predictor does for a dynamic-shape model): a 4:3 photo runs as
    320x256 instead of 320x320, a fifth less compute.
    """
    h, w = img.shape[:2]
    orig_w, orig_h = orig if orig is not None else (w, h)
    out_h, out_w = size
    new_w, new_h = _resized(orig_w, orig_h, size)
    if stride is not None:
        out_w, out_h = new_w + (out_w - new_w) % stride, new_h + (out_h - new_h) % stride
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, Letterbox(orig_w=orig_w, orig_h=orig_h, new_w=new_w, new_h=new_h, left=left, top=top)


def network_input(padded: Sequence[np.ndarray]) -> np.ndarray:
    """Letterboxed HWC uint8 images to the NCHW float32 batch in [0, 1] that ultralytics feeds the network."""
    return np.stack(padded).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; drops boxes whose IoU with a kept one is above the threshold (torchvision rule)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(pred: np.ndarray, box: Letterbox, conf: float, iou: float, max_det: int = 300) -> np.ndarray:
    """Raw ``[4+nc, anchors]`` head output to ``[N, 6]`` (x1, y1, x2, y2, score, class) in original pixels."""
    x = pred.T
    cls_scores = x[:, 4:]
    cls = cls_scores.argmax(1)
    score = cls_scores[np.arange(len(cls)), cls]
    keep = score > conf
    if not keep.any():
        return np.zeros((0, 6), np.float32)
    xywh, score, cls = x[keep, :4], score[keep], cls[keep]
    xyxy = np.empty_like(xywh)
    xyxy[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    xyxy[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    idx = nms(xyxy + (cls * MAX_WH)[:, None], score, iou)[:max_det]
    xyxy, score, cls = xyxy[idx], score[idx], cls[idx]
    # Undo the letterbox per axis, from the rounded resized size (ultralytics ``scale_boxes``).
    gx, gy = box.new_w / box.orig_w, box.new_h / box.orig_h
    xyxy[:, [0, 2]] = np.clip((xyxy[:, [0, 2]] - box.left) / gx, 0, box.orig_w)
    xyxy[:, [1, 3]] = np.clip((xyxy[:, [1, 3]] - box.top) / gy, 0, box.orig_h)
    return np.concatenate([xyxy, score[:, None], cls[:, None]], axis=1).astype(np.float32)
