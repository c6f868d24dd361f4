"""The Triton model's pre/post-processing against ultralytics' own functions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.triton.detector_ops import (
    ImageRejected,
    Letterbox,
    decode_image,
    letterbox,
    nms,
    parse_onnx_metadata,
    postprocess,
)


@pytest.mark.parametrize("shape", [(320, 320), (240, 400), (500, 180), (97, 33), (1000, 1000), (321, 319)])
def test_letterbox_matches_ultralytics(shape: tuple[int, int]) -> None:
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    ours, box = letterbox(img, (320, 320))
    theirs = LetterBox((320, 320), auto=False)(image=img)
    assert ours.shape == (320, 320, 3)
    np.testing.assert_array_equal(ours, theirs)
    assert (box.orig_w, box.orig_h) == (shape[1], shape[0])


def test_postprocess_undoes_letterbox_like_scale_boxes() -> None:
    import torch
    from ultralytics.utils.ops import scale_boxes

    box = letterbox(np.zeros((240, 400, 3), np.uint8), (320, 320))[1]
    # one anchor: centre (160, 160) size 40x20 in network pixels, class 1 with score 0.9
    pred = np.zeros((4 + 3, 1), np.float32)
    pred[:4, 0] = [160, 160, 40, 20]
    pred[5, 0] = 0.9
    out = postprocess(pred, box, conf=0.25, iou=0.7)
    expected = scale_boxes((320, 320), torch.tensor([[140.0, 150.0, 180.0, 170.0]]), (240, 400)).numpy()
    np.testing.assert_allclose(out[0, :4], expected[0], atol=1e-3)
    assert out[0, 4] == pytest.approx(0.9)
    assert out[0, 5] == 1


def test_nms_is_class_aware_and_suppresses_overlaps() -> None:
    # two overlapping boxes of class 0, one identical box of class 1
    pred = np.zeros((4 + 2, 3), np.float32)
    pred[:4, 0] = [50, 50, 20, 20]
    pred[:4, 1] = [51, 50, 20, 20]
    pred[:4, 2] = [50, 50, 20, 20]
    pred[4, 0], pred[4, 1], pred[5, 2] = 0.9, 0.8, 0.7
    box = Letterbox(orig_w=100, orig_h=100, new_w=100, new_h=100, left=0, top=0)
    out = postprocess(pred, box, conf=0.25, iou=0.7)
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0]
    assert out[out[:, 5] == 0][0, 4] == pytest.approx(0.9)


def test_nms_keeps_boxes_below_iou_threshold() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], np.float32)
    keep = nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.5)
    assert keep.tolist() == [0, 1, 2]  # IoU of the first two is 1/3
    keep = nms(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.3)
    assert keep.tolist() == [0, 2]


def test_postprocess_filters_by_score() -> None:
    pred = np.zeros((5, 2), np.float32)
    pred[:4, :] = [[10, 50], [10, 50], [5, 5], [5, 5]]
    pred[4] = [0.2, 0.3]
    box = Letterbox(orig_w=100, orig_h=100, new_w=100, new_h=100, left=0, top=0)
    assert len(postprocess(pred, box, conf=0.25, iou=0.7)) == 1
    assert len(postprocess(pred, box, conf=0.5, iou=0.7)) == 0


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_decode_formats_to_rgb(fmt: str) -> None:
    arr = decode_image(_encode(Image.new("RGB", (30, 20), (10, 200, 30)), fmt), 10**7, 10**7)
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


def test_decode_applies_exif_orientation() -> None:
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees
    arr = decode_image(_encode(img, "JPEG", exif=exif), 10**7, 10**7)
    assert arr.shape == (40, 20, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_decode_turns_any_mode_into_rgb(mode: str) -> None:
    arr = decode_image(_encode(Image.new(mode, (8, 6)), "PNG"), 10**7, 10**7)
    assert arr.shape == (6, 8, 3)


def test_decode_rejects_bad_inputs() -> None:
    with pytest.raises(ImageRejected, match="empty"):
        decode_image(b"", 100, 100)
    with pytest.raises(ImageRejected, match="cannot decode"):
        decode_image(b"\x89PNG\r\n\x1a\nnot really", 10**6, 10**6)
    png = _encode(Image.new("L", (200, 200)), "PNG")
    with pytest.raises(ImageRejected, match="pixels"):
        decode_image(png, 10**6, 200 * 200 - 1)
    with pytest.raises(ImageRejected, match="bytes"):
        decode_image(png, len(png) - 1, 10**6)
    truncated = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    with pytest.raises(ImageRejected):
        decode_image(truncated, 10**6, 10**6)


def test_onnx_metadata_is_required() -> None:
    meta = parse_onnx_metadata({"names": "{0: 'a', 1: 'b'}", "imgsz": "[320, 256]", "stride": "32"})
    assert meta.names == ("a", "b") and meta.imgsz == (320, 256)
    with pytest.raises(ValueError, match="names"):
        parse_onnx_metadata({})
