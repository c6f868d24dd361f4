"""The Triton model's pre/post-processing against ultralytics' own functions."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from core import image_decode
from core.image_decode import Decoded, ImageRejected, decode_image, fitted_size
from serving.triton import detector_ops
from serving.triton.detector_ops import (
    MAX_NMS,
    DetectorMeta,
    Letterbox,
    letterbox,
    letterbox_stride,
    network_input,
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


@pytest.mark.parametrize(
    ("shape", "size", "rect"),
    [
        ((240, 400), (320, 320), (192, 320)),
        ((400, 240), (320, 320), (320, 192)),
        ((500, 180), (320, 320), (320, 128)),
        ((97, 33), (320, 320), (320, 128)),
        ((300, 300), (320, 320), (320, 320)),
        ((321, 319), (320, 320), (320, 320)),
        ((1080, 1920), (640, 640), (384, 640)),
        ((480, 640), (320, 256), (192, 256)),
    ],
)
def test_rect_letterbox_matches_ultralytics_auto(
    shape: tuple[int, int], size: tuple[int, int], rect: tuple[int, int]
) -> None:
    from ultralytics.data.augment import LetterBox

    img = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    ours, box = letterbox(img, size, stride=32)
    theirs = LetterBox(size, auto=True, stride=32)(image=img)
    assert ours.shape == (*rect, 3)
    np.testing.assert_array_equal(ours, theirs)
    # the image sits where the square letterbox puts it, less the padding dropped on each side
    square_box = letterbox(img, size)[1]
    assert (box.new_w, box.new_h) == (square_box.new_w, square_box.new_h)
    assert (size[1] - rect[1]) // 2 == square_box.left - box.left


def test_a_rectangle_needs_dynamic_height_and_width() -> None:
    meta = DetectorMeta(names=("a",), imgsz=(320, 320), stride=32)
    assert letterbox_stride(["batch", 3, "height", "width"], meta, rect=True) == 32
    assert letterbox_stride(["batch", 3, "height", "width"], meta, rect=False) is None
    assert letterbox_stride([1, 3, 320, 320], meta, rect=True) is None
    assert letterbox_stride(["batch", 3, 320, 320], meta, rect=True) is None


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


def _dense_prediction(anchors: int, size: int, seed: int = 0) -> np.ndarray:
    """A head output where every anchor has a small score: at conf 0, all of them are candidates."""
    rng = np.random.default_rng(seed)
    pred = np.zeros((4 + 3, anchors), np.float32)
    pred[:2] = rng.uniform(0, size, (2, anchors))
    pred[2:4] = rng.uniform(4, 60, (2, anchors))
    pred[4:] = rng.uniform(0.001, 0.05, (3, anchors))
    return pred


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """The textbook one-box-at-a-time greedy NMS, as the reference for the blocked one."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        order = rest[iw * ih / (areas[i] + areas[rest] - iw * ih + 1e-9) <= iou_threshold]
    return keep


@pytest.mark.parametrize(("n", "spread", "iou"), [(700, 320, 0.7), (700, 40, 0.5), (1500, 320, 0.3), (600, 5, 0.7)])
def test_blocked_nms_keeps_what_greedy_nms_keeps(n: int, spread: float, iou: float) -> None:
    rng = np.random.default_rng(n)
    xy, wh = rng.uniform(0, spread, (n, 2)), rng.uniform(4, 60, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    reference = _greedy_nms(boxes, scores, iou)
    assert nms(boxes, scores, iou).tolist() == reference
    # Stopping at max_det keeps the same first boxes.
    assert nms(boxes, scores, iou, max_det=50).tolist() == reference[:50]


def test_nms_at_conf_0_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every anchor passes conf=0: at most MAX_NMS enter NMS, which looks at little past max_det boxes."""
    entered: list[int] = []
    pairs: list[int] = []
    real_nms, real_iou = detector_ops.nms, detector_ops._iou

    def counting_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_det: int | None = None) -> np.ndarray:
        entered.append(len(boxes))
        return real_nms(boxes, scores, iou, max_det)

    def counting_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pairs.append(len(a) * len(b))
        return real_iou(a, b)

    monkeypatch.setattr(detector_ops, "nms", counting_nms)
    monkeypatch.setattr(detector_ops, "_iou", counting_iou)
    box = Letterbox(orig_w=1280, orig_h=1280, new_w=1280, new_h=1280, left=0, top=0)
    # imgsz 1280 has 33600 anchors; more than MAX_NMS
    out = postprocess(_dense_prediction(33_600, 1280), box, conf=0.0, iou=0.7, max_det=300)
    assert len(out) == 300
    assert entered == [MAX_NMS]
    # Sparse boxes at conf 0: about max_det boxes are visited, a few blocks, not 30000 x 30000 pairs.
    assert sum(pairs) < 4 * 256 * (300 + 256)
    # The highest-scoring candidates are the ones kept: the cap drops only the lowest scores.
    pred = _dense_prediction(33_600, 1280)
    best = pred[4:].max(0)
    assert out[:, 4].min() >= np.sort(best)[-MAX_NMS]


def test_postprocess_with_candidate_cap_matches_uncapped_below_it() -> None:
    box = Letterbox(orig_w=320, orig_h=320, new_w=320, new_h=320, left=0, top=0)
    pred = _dense_prediction(2100, 320, seed=5)
    assert np.array_equal(postprocess(pred, box, 0.0, 0.7), postprocess(pred, box, 0.0, 0.7, max_nms=10**6))


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


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_decode_formats_to_rgb(fmt: str) -> None:
    out = decode_image(_encode(Image.new("RGB", (30, 20), (10, 200, 30)), fmt), 10**7, 10**7)
    assert out.pixels.shape == (20, 30, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height) == (30, 20)


def test_decode_applies_exif_orientation() -> None:
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees
    out = decode_image(_encode(img, "JPEG", exif=exif), 10**7, 10**7)
    assert out.pixels.shape == (40, 20, 3)
    assert (out.width, out.height) == (20, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_decode_turns_any_mode_into_rgb(mode: str) -> None:
    out = decode_image(_encode(Image.new(mode, (8, 6)), "PNG"), 10**7, 10**7)
    assert out.pixels.shape == (6, 8, 3)


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


def _pillow_reference(data: bytes) -> np.ndarray:
    """The decode as it was before OpenCV: Pillow, exif_transpose, convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients, a few high-contrast rectangles and distinct corners (to see turns)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height) + 64], -1).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        arr[y0 : y0 + height // 6, x0 : x0 + width // 6] = rng.integers(0, 256, 3)
    s = max(min(width, height) // 8, 2)
    arr[:s, :s], arr[:s, -s:], arr[-s:, :s] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return Image.fromarray(arr)


def _jpeg(img: Image.Image, orientation: int = 1, **kw: object) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=92, exif=exif, **kw)


@pytest.fixture
def imdecode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Flags of every cv2.imdecode call made by detector_ops."""
    calls: list[int] = []
    real = cv2.imdecode

    def spy(buf: np.ndarray, flags: int) -> np.ndarray | None:
        calls.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"subsampling": 0}], ids=["420", "progressive", "444"])
def test_jpeg_is_decoded_by_opencv_like_pillow(mode: str, kw: dict[str, object], imdecode_calls: list[int]) -> None:
    data = _encode(_photo(301, 199).convert(mode), "JPEG", quality=92, **kw)
    out = decode_image(data, 10**7, 10**7)
    assert imdecode_calls == [cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION]
    ref = _pillow_reference(data)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == ref.shape
    assert np.abs(out.pixels.astype(int) - ref).max() <= 1
    assert (out.width, out.height) == (301, 199)


def test_mpo_and_grey_reduced_decode_use_opencv(imdecode_calls: list[int]) -> None:
    photo = _photo(1280, 960)
    mpo = _encode(photo, "MPO", save_all=True, append_images=[photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)])
    np.testing.assert_allclose(decode_image(mpo, 10**8, 10**8).pixels, _pillow_reference(mpo), atol=1)
    grey = decode_image(_jpeg(photo.convert("L")), 10**8, 10**8, target=(320, 320))
    assert grey.pixels.shape == (240, 320, 3) and (grey.width, grey.height) == (1280, 960)
    assert imdecode_calls == [
        cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
        cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    ]


def test_bench_images_decode_as_with_pillow(imdecode_calls: list[int]) -> None:
    from labelloop.bench_rig import render_images

    for image in render_images(4, 2024):
        out = decode_image(image.data, 10**7, 10**7)
        np.testing.assert_array_equal(out.pixels, _pillow_reference(image.data))
        assert (out.width, out.height) == (image.width, image.height)
    assert len(imdecode_calls) == 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_opencv_orientation_matches_pillow(orientation: int, imdecode_calls: list[int]) -> None:
    data = _jpeg(_photo(96, 64), orientation)
    out = decode_image(data, 10**7, 10**7)
    assert imdecode_calls, "the JPEG went through Pillow"
    ref = _pillow_reference(data)
    assert out.pixels.shape == ref.shape
    assert np.abs(out.pixels.astype(int) - ref).max() <= 1
    assert (out.width, out.height) == (ref.shape[1], ref.shape[0])


def test_xmp_orientation_is_applied_like_pillow() -> None:
    # OpenCV reads only EXIF; Pillow (and so the old decode) also honours an XMP tiff:Orientation.
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
    )
    data = _encode(_photo(96, 64), "JPEG", quality=92, xmp=xmp)
    out = decode_image(data, 10**7, 10**7)
    np.testing.assert_allclose(out.pixels, _pillow_reference(data), atol=1)
    assert (out.width, out.height) == (64, 96)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "RGB"])
def test_png_modes_match_pillow(mode: str) -> None:
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (24, 40, 4), dtype=np.uint8), "RGBA")
    img = (rgba if "A" in mode else rgba.convert("RGB")).convert(mode)
    data = _encode(img, "PNG")
    out = decode_image(data, 10**7, 10**7)
    np.testing.assert_array_equal(out.pixels, _pillow_reference(data))


def test_16bit_grey_png_keeps_the_high_byte() -> None:
    grey = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    out = decode_image(_encode(Image.fromarray(grey), "PNG"), 10**7, 10**7)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (32, 32, 3)
    np.testing.assert_array_equal(out.pixels[..., 0], grey >> 8)
    np.testing.assert_array_equal(out.pixels[..., 0], out.pixels[..., 2])


def test_cmyk_jpeg_and_gif_go_through_pillow(imdecode_calls: list[int]) -> None:
    for data in (_jpeg(_photo(40, 30).convert("CMYK")), _encode(_photo(40, 30).convert("P"), "GIF")):
        out = decode_image(data, 10**7, 10**7)
        np.testing.assert_array_equal(out.pixels, _pillow_reference(data))
    assert imdecode_calls == []


def test_falls_back_to_pillow_where_opencv_cannot_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: None)
    data = _jpeg(_photo(60, 40), 6)
    out = decode_image(data, 10**7, 10**7, target=(16, 16))
    np.testing.assert_array_equal(out.pixels, _pillow_reference(data))
    assert (out.width, out.height) == (40, 60)


@pytest.mark.parametrize("cut", [200, -2])
def test_truncated_jpeg_is_rejected(cut: int) -> None:
    data = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)))
    with pytest.raises(ImageRejected, match="cannot decode"):
        decode_image(data[:cut], 10**7, 10**7)


def test_pixel_limit_is_checked_before_decoding(imdecode_calls: list[int]) -> None:
    data = _jpeg(_photo(200, 100))
    with pytest.raises(ImageRejected, match=r"image is 200x100 pixels, limit 19999"):
        decode_image(data, 10**7, 200 * 100 - 1, target=(32, 32))
    assert imdecode_calls == []


@pytest.mark.parametrize(
    ("size", "target", "decoded"),
    [
        ((4000, 3000), (320, 320), (500, 375)),  # 1/8
        ((2400, 1600), (320, 320), (600, 400)),  # 1/8 would be 300 wide, under 320
        ((640, 640), (320, 320), (320, 320)),  # 1/2 exactly
        ((641, 480), (320, 320), (321, 240)),  # 1/2, rounding up: ceil(641 / 2) = 321
        ((637, 637), (320, 320), (637, 637)),  # 1/2 would be 319, under 320: full decode
        ((500, 375), (320, 320), (500, 375)),  # 1/2 is too small: full decode
        ((100, 60), (320, 320), (100, 60)),  # the letterbox enlarges: full decode
        ((1283, 3001), (320, 256), (161, 376)),  # portrait into a non-square input: 1/8 covers 137x320
    ],
)
def test_reduced_jpeg_decode_size(size: tuple[int, int], target: tuple[int, int], decoded: tuple[int, int]) -> None:
    out = decode_image(_jpeg(_photo(*size)), 10**8, 10**8, target=target)
    assert (out.width, out.height) == size
    assert (out.pixels.shape[1], out.pixels.shape[0]) == decoded


def test_reduction_never_makes_the_letterbox_enlarge() -> None:
    rng = np.random.default_rng(3)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(1, 9000, 2))
        target = (int(rng.integers(16, 1300)), int(rng.integers(16, 1300)))
        f = image_decode._jpeg_reduction(w, h, target)
        new_w, new_h = fitted_size(w, h, target)
        if f > 1:
            assert -(-w // f) >= new_w and -(-h // f) >= new_h
        if f < 8:  # the next factor up would have been too small
            assert -(-w // (2 * f)) < new_w or -(-h // (2 * f)) < new_h


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_decode_letterboxes_like_the_full_decode(orientation: int) -> None:
    data = _jpeg(_photo(2400, 1600, seed=orientation), orientation)
    full = decode_image(data, 10**8, 10**8)
    reduced = decode_image(data, 10**8, 10**8, target=(320, 320))
    assert reduced.pixels.shape[0] * reduced.pixels.shape[1] * 10 < full.pixels.size // 3
    assert (reduced.width, reduced.height) == (full.width, full.height)
    full_img, full_box = letterbox(full.pixels, (320, 320))
    red_img, red_box = letterbox(reduced.pixels, (320, 320), orig=(reduced.width, reduced.height))
    assert red_img.shape == full_img.shape == (320, 320, 3)
    assert np.abs(red_img.astype(int) - full_img).mean() < 3
    assert red_box == full_box
    # one detection, centre (150, 170) size 60x40 in network pixels, back to original pixels
    pred = np.zeros((4 + 1, 1), np.float32)
    pred[:, 0] = [150, 170, 60, 40, 0.9]
    np.testing.assert_allclose(
        postprocess(pred, red_box, 0.25, 0.7)[:, :4], postprocess(pred, full_box, 0.25, 0.7)[:, :4], atol=1
    )


def test_letterbox_orig_sets_the_size_boxes_map_back_to() -> None:
    small = np.full((400, 600, 3), 50, np.uint8)
    out, box = letterbox(small, (320, 320), orig=(2400, 1600))
    assert (box.orig_w, box.orig_h, box.new_w, box.new_h, box.left, box.top) == (2400, 1600, 320, 213, 0, 53)
    assert out.shape == (320, 320, 3)
    pred = np.zeros((5, 1), np.float32)
    pred[:, 0] = [160, 160, 32, 32, 0.9]  # 144..176 in network pixels; 320 / 2400 and 213 / 1600 per pixel
    expected = [144 * 7.5, (144 - 53) * 1600 / 213, 176 * 7.5, (176 - 53) * 1600 / 213]
    np.testing.assert_allclose(postprocess(pred, box, 0.25, 0.7)[0, :4], expected, rtol=1e-5)
    assert letterbox(small, (320, 320), orig=(600, 400))[1] == letterbox(small, (320, 320))[1]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` 8-bit grey pixels and holds one row: what a bomb sends first."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pillow_keeps_its_bomb_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    # A fresh interpreter: other libraries in this session may lift the limit themselves (ultralytics can).
    probe = "import core.image_decode, PIL.Image; print(PIL.Image.MAX_IMAGE_PIXELS)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert int(out) == 1024 * 1024 * 1024 // 4 // 3  # Pillow's default, untouched by the import
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345)
    decode_image(_encode(Image.new("RGB", (8, 8)), "PNG"), 10**7, 10**7)
    assert Image.MAX_IMAGE_PIXELS == 12345  # and untouched by a decode


@pytest.mark.parametrize(
    "size",
    [
        (12_000, 12_000),  # 144 MP: over Pillow's limit (it would warn; an error under -W error)
        (50_000, 50_000),  # 2.5 GP: over twice Pillow's limit (it would raise DecompressionBombError)
        (8_000, 8_000),  # 64 MP: under Pillow's limit, over ours
    ],
)
def test_bomb_header_is_refused_with_a_clear_message_without_decoding(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch, imdecode_calls: list[int]
) -> None:
    loads: list[str] = []
    monkeypatch.setattr(Image.Image, "load", lambda im: loads.append(im.format))
    data = _png_header(*size)
    assert len(data) < 200
    with pytest.raises(ImageRejected, match=rf"image is {size[0]}x{size[1]} pixels, limit 60000000 .*bomb"):
        decode_image(data, 10**6, 60_000_000)
    assert loads == [] and imdecode_calls == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_image_between_pillows_limit_and_ours_decodes(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our cap is the setting: an image it allows decodes, with no Pillow warning (an error here)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for size in ((50, 40), (100, 100)):  # over Pillow's 1x (warns) and 2x (raises) limit
        out = decode_image(_encode(_photo(*size).convert("RGB"), fmt), 10**7, 10**7)
        assert (out.width, out.height) == size
    assert Image.MAX_IMAGE_PIXELS == 1000
    # ...and above our cap it is ours that refuses, with our message.
    with pytest.raises(ImageRejected, match="limit 5000"):
        decode_image(_encode(_photo(100, 100), fmt), 10**7, 5000)


def test_decoded_is_frozen() -> None:
    out = decode_image(_jpeg(_photo(8, 8)), 10**7, 10**7)
    assert isinstance(out, Decoded)
    with pytest.raises(AttributeError):
        out.width = 3  # type: ignore[misc]


def test_onnx_metadata_is_required() -> None:
    meta = parse_onnx_metadata({"names": "{0: 'a', 1: 'b'}", "imgsz": "[320, 256]", "stride": "32"})
    assert meta.names == ("a", "b") and meta.imgsz == (320, 256)
    with pytest.raises(ValueError, match="names"):
        parse_onnx_metadata({})


def test_network_input_is_nchw_float32_in_unit_range_with_channels_kept() -> None:
    first = np.zeros((4, 6, 3), np.uint8)
    first[..., 0], first[..., 2] = 255, 51
    second = np.full((4, 6, 3), 114, np.uint8)
    batch = network_input([first, second])
    assert batch.shape == (2, 3, 4, 6) and batch.dtype == np.float32
    assert batch[0, 0].min() == 1.0 and batch[0, 1].max() == 0.0
    assert batch[0, 2] == pytest.approx(np.full((4, 6), 0.2))
    assert batch[1] == pytest.approx(np.full((3, 4, 6), 114 / 255))
