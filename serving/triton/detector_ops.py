"""Letterbox and NMS of the Triton detector, as ultralytics does them (decoding: ``image_decode``).

This file is copied next to ``model.py`` into every model version, so a version folder is
self-contained and runs on any Triton with the python backend (this machine, NVIDIA's
container, a Jetson). It imports only numpy and OpenCV.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DetectorMeta",
    "Letterbox",
    "letterbox",
    "letterbox_stride",
    "network_input",
    "nms",
    "parse_onnx_metadata",
    "postprocess",
    "top_candidates",
]

PAD_VALUE = 114
MAX_WH = 7680  # class offset for class-aware NMS, as ultralytics
# Most candidates that enter NMS, the highest scores first (ultralytics' ``max_nms``): with the stop at
# ``max_det`` kept boxes, NMS costs at most max_det x MAX_NMS box comparisons at any threshold.
MAX_NMS = 30_000
MAX_DET = 300


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


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` with every box of ``b`` (xyxy), as torchvision computes it."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_det: int | None = None, block: int = 256
) -> np.ndarray:
    """Greedy NMS; drops boxes whose IoU with a kept one is above the threshold (torchvision rule).

    Boxes are visited in score order, ``block`` at a time: each block is checked against the boxes
    kept so far in one array operation, then against itself. With ``max_det`` it stops at that many
    kept boxes, having looked only at the boxes up to the last one kept: at a threshold of 0 that is
    about ``max_det`` boxes, not every anchor against every other (a full run's first ``max_det``).
    """
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    limit = len(order) if max_det is None else max_det
    keep: list[int] = []
    for start in range(0, len(order), block):
        chunk = ranked[start : start + block]
        # The block's boxes that no kept box suppresses; then greedy among them, in score order.
        rows = np.arange(start, start + len(chunk))
        if keep:
            rows = rows[(_iou(ranked[keep], chunk) <= iou_threshold).all(0)]
        overlaps = _iou(ranked[rows], ranked[rows]) > iou_threshold
        alive = np.ones(len(rows), bool)
        for r in range(len(rows)):
            if not alive[r]:
                continue
            keep.append(int(rows[r]))
            if len(keep) == limit:
                return order[np.asarray(keep, dtype=np.int64)]
            alive[r + 1 :] &= ~overlaps[r, r + 1 :]
    return order[np.asarray(keep, dtype=np.int64)]


def top_candidates(score: np.ndarray, max_nms: int = MAX_NMS) -> np.ndarray:
    """Indices of the ``max_nms`` highest scores (all when fewer), as ultralytics caps NMS's input."""
    if len(score) <= max_nms:
        return np.arange(len(score))
    return np.argpartition(-score, max_nms - 1)[:max_nms]


def postprocess(
    pred: np.ndarray, box: Letterbox, conf: float, iou: float, max_det: int = MAX_DET, max_nms: int = MAX_NMS
) -> np.ndarray:
    """Raw ``[4+nc, anchors]`` head output to ``[N, 6]`` (x1, y1, x2, y2, score, class) in original pixels.

    Bounded at any ``conf`` (0 included): at most ``max_nms`` candidates enter NMS, which stops at
    ``max_det`` kept boxes.
    """
    x = pred.T
    cls_scores = x[:, 4:]
    cls = cls_scores.argmax(1)
    score = cls_scores[np.arange(len(cls)), cls]
    keep = score > conf
    if not keep.any():
        return np.zeros((0, 6), np.float32)
    xywh, score, cls = x[keep, :4], score[keep], cls[keep]
    top = top_candidates(score, max_nms)
    xywh, score, cls = xywh[top], score[top], cls[top]
    xyxy = np.empty_like(xywh)
    xyxy[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    xyxy[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    idx = nms(xyxy + (cls * MAX_WH)[:, None], score, iou, max_det)
    xyxy, score, cls = xyxy[idx], score[idx], cls[idx]
    # Undo the letterbox per axis, from the rounded resized size (ultralytics ``scale_boxes``).
    gx, gy = box.new_w / box.orig_w, box.new_h / box.orig_h
    xyxy[:, [0, 2]] = np.clip((xyxy[:, [0, 2]] - box.left) / gx, 0, box.orig_w)
    xyxy[:, [1, 3]] = np.clip((xyxy[:, [1, 3]] - box.top) / gy, 0, box.orig_h)
    return np.concatenate([xyxy, score[:, None], cls[:, None]], axis=1).astype(np.float32)
