"""Pre- and post-processing of the Triton detector, as ultralytics does it.

This file is copied next to ``model.py`` into every model version, so a version folder is
self-contained and runs on any Triton with the python backend (this machine, NVIDIA's
container, a Jetson). It imports only numpy, Pillow and OpenCV.
"""

from __future__ import annotations

import ast
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DetectorMeta",
    "ImageRejected",
    "Letterbox",
    "decode_image",
    "letterbox",
    "nms",
    "parse_onnx_metadata",
    "postprocess",
]

PAD_VALUE = 114
MAX_WH = 7680  # class offset for class-aware NMS, as ultralytics

# Pillow's own bomb guard would warn first; ours is the explicit limit.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(ValueError):
    """An input image cannot be decoded or breaks a limit (maps to a per-request error)."""


@dataclass(frozen=True)
class DetectorMeta:
    """What a version says about itself: class names and input size."""

    names: tuple[str, ...]
    imgsz: tuple[int, int]
    stride: int


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


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode bytes to an RGB uint8 array in display orientation (EXIF applied)."""
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
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(f"cannot decode image: {exc}") from exc


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad with grey 114, centred (ultralytics ``LetterBox``)."""
    h, w = img.shape[:2]
    out_h, out_w = size
    r = min(out_h / h, out_w / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, Letterbox(orig_w=w, orig_h=h, new_w=new_w, new_h=new_h, left=left, top=top)


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
