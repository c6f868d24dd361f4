"""Synthetic metal-part defect images, so tests and the default model need no real data."""

from __future__ import annotations

import json
import logging
import math
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "Box", "Sample", "render_sample", "write_dataset"]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("dentado", "concave", "perforation")

FloatArray = npt.NDArray[np.float32]

_MARKER = "# labelloop synthetic defect dataset"
_ASPECTS = (0.6, 0.75, 1.0, 1.0, 1.33, 1.5, 1.78)
_SIDE_MIN, _SIDE_MAX = 224, 640
# Relative to the shorter image side: (min, max) of each class's largest extent.
_SIZE_RANGE = {0: (0.09, 0.25), 1: (0.07, 0.22), 2: (0.05, 0.16)}
_TINTS = (
    (1.0, 1.0, 1.0),
    (0.94, 0.98, 1.06),
    (1.05, 1.0, 0.92),
    (0.97, 1.03, 0.98),
    (1.14, 1.0, 0.72),
)
_MAX_IOU = 0.05
_PLACE_TRIES = 40
_SUPERSAMPLE = 4
# Pixels stored = display.transpose(_STORE[o]); EXIF-aware viewers undo it.
_STORE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
_ORIENTATION_TAG = 0x0112
_FORMAT_SHARES = (("exif", 0.15), ("gray", 0.15), ("rgba", 0.05))


@dataclass(frozen=True)
class Box:
    """One labelled defect, in pixel coordinates of the displayed image."""

    cls: int
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Sample:
    """A display-orientation image with the boxes that label it."""

    image: Image.Image
    boxes: tuple[Box, ...]


def _grid(h: int, w: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates, so shapes are sampled where pixels are."""
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    return np.broadcast_to(xs, (h, w)), np.broadcast_to(ys, (h, w))


def _smooth1d(values: FloatArray, width: int) -> FloatArray:
    """Box-filter a 1-D signal so streaks have a width, not single-pixel speckle."""
    if width <= 1:
        return values
    kernel = np.full(width, 1.0 / width, dtype=np.float32)
    return np.convolve(values, kernel, mode="same").astype(np.float32)


def _metal(rng: np.random.Generator, h: int, w: int) -> FloatArray:
    """Brushed-metal albedo: a base grey, directional streaks and a soft gradient."""
    xs, ys = _grid(h, w)
    base = rng.uniform(0.38, 0.75)
    theta = rng.choice([0.0, 0.0, math.pi / 2, math.pi / 2, rng.uniform(0.0, math.pi)])
    across = -xs * math.sin(theta) + ys * math.cos(theta)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    across_idx = (across - across.min()).astype(np.int64)
    along_idx = (along - along.min()).astype(np.int64)

    fine = _smooth1d(rng.standard_normal(int(across_idx.max()) + 1, dtype=np.float32), 2)
    coarse = _smooth1d(rng.standard_normal(int(across_idx.max()) + 1, dtype=np.float32), 9)
    fade = _smooth1d(rng.standard_normal(int(along_idx.max()) + 1, dtype=np.float32), 41)
    fade = 1.0 + 0.35 * fade / (np.abs(fade).max() + 1e-6)
    streaks = (rng.uniform(0.015, 0.05) * fine)[across_idx] * fade[along_idx]
    streaks += (rng.uniform(0.01, 0.04) * coarse / (np.abs(coarse).max() + 1e-6))[across_idx]

    phi = rng.uniform(0.0, 2 * math.pi)
    diag = math.hypot(w, h)
    ramp = ((xs - w / 2) * math.cos(phi) + (ys - h / 2) * math.sin(phi)) / diag
    albedo: FloatArray = (base + streaks + rng.uniform(-0.15, 0.15) * ramp).astype(np.float32)
    return albedo


def _illumination(rng: np.random.Generator, h: int, w: int) -> FloatArray:
    """A smooth light falloff (vignette or directional), since parts are never evenly lit."""
    xs, ys = _grid(h, w)
    if rng.random() < 0.5:
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        r2 = ((xs - cx) / w) ** 2 + ((ys - cy) / h) ** 2
        field: FloatArray = 1.0 - rng.uniform(0.2, 0.7) * r2
    else:
        phi = rng.uniform(0.0, 2 * math.pi)
        t = ((xs - w / 2) * math.cos(phi) + (ys - h / 2) * math.sin(phi)) / math.hypot(w, h)
        field = 1.0 + rng.uniform(0.1, 0.45) * t
    return field.astype(np.float32)


def _aa(signed_px: FloatArray) -> FloatArray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(signed_px + 0.5, 0.0, 1.0).astype(np.float32)


def _ellipse_extent(a: float, b: float, psi: float) -> tuple[float, float]:
    """Half width and half height of a rotated ellipse's bounding box."""
    c, s = math.cos(psi), math.sin(psi)
    return math.sqrt((a * c) ** 2 + (b * s) ** 2), math.sqrt((a * s) ** 2 + (b * c) ** 2)


def _local(cx: float, cy: float, ex: float, ey: float, h: int, w: int) -> tuple[slice, slice, FloatArray, FloatArray]:
    """A patch around (cx, cy) clipped to the image, with coordinates relative to the centre."""
    x0, x1 = max(0, int(cx - ex) - 2), min(w, int(math.ceil(cx + ex)) + 2)
    y0, y1 = max(0, int(cy - ey) - 2), min(h, int(math.ceil(cy + ey)) + 2)
    xs, ys = _grid(y1 - y0, x1 - x0)
    return slice(y0, y1), slice(x0, x1), xs + (x0 - cx), ys + (y0 - cy)


def _tight_box(cls: int, mask: npt.NDArray[np.bool_], rows: slice, cols: slice) -> Box | None:
    """The box around the pixels a defect actually changed."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return Box(
        cls,
        float(cols.start + xs[0]),
        float(rows.start + ys[0]),
        float(cols.start + xs[-1] + 1),
        float(rows.start + ys[-1] + 1),
    )


class _Defect(ABC):
    """A defect whose extent is known before drawing, so it can be placed without overlaps."""

    cls: int
    ex: float
    ey: float

    def draw(self, img: FloatArray, cx: float, cy: float) -> Box | None:
        """Paint the defect into the albedo image and return its tight box."""
        h, w = img.shape
        rows, cols, xs, ys = _local(cx, cy, self.ex, self.ey, h, w)
        changed = self._paint(img[rows, cols], xs, ys)
        return _tight_box(self.cls, changed, rows, cols)

    @abstractmethod
    def _paint(self, patch: FloatArray, xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        """Modify `patch` in place (coordinates relative to the centre); return what visibly changed."""


class _Tear(_Defect):
    """Dentado: a dark zigzag band, its teeth alternating between the edges of a slightly bent axis."""

    cls = 0

    def __init__(self, rng: np.random.Generator, length: float) -> None:
        psi = rng.uniform(0.0, math.pi)
        half_w = length * rng.uniform(0.09, 0.16)
        steps = 2 * int(rng.integers(4, 9))
        t = np.linspace(-length / 2, length / 2, steps + 1)
        bend = rng.uniform(-0.12, 0.12) * length * (1 - (2 * t / length) ** 2)
        jitter = rng.uniform(0.8, 1.2, steps + 1)
        even = np.arange(steps + 1) % 2 == 0
        high = np.where(even, 1.0, 0.15) * half_w * jitter
        low = np.where(even, 0.15, 1.0) * half_w * jitter[::-1]
        high[[0, -1]] = low[[0, -1]] = 0.0
        along = np.concatenate([t, t[::-1]])
        across = np.concatenate([bend + high, (bend - low)[::-1]])
        c, s = math.cos(psi), math.sin(psi)
        self.poly = np.stack([along * c - across * s, along * s + across * c], axis=1)
        self.tone = rng.uniform(0.05, 0.16)
        self.ex = float(np.abs(self.poly[:, 0]).max())
        self.ey = float(np.abs(self.poly[:, 1]).max())

    def _paint(self, patch: FloatArray, xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        """Rasterise the polygon supersampled, for clean anti-aliased teeth."""
        ph, pw = patch.shape
        k = _SUPERSAMPLE
        ox, oy = float(xs[0, 0]) - 0.5, float(ys[0, 0]) - 0.5
        mask = Image.new("L", (pw * k, ph * k), 0)
        ImageDraw.Draw(mask).polygon([((x - ox) * k, (y - oy) * k) for x, y in self.poly], fill=255)
        alpha = np.asarray(mask.resize((pw, ph), Image.Resampling.BOX), dtype=np.float32) / 255.0
        patch[:] = patch * (1 - alpha) + self.tone * alpha
        return alpha > 0.25


class _Round(_Defect):
    """An elliptical defect; subclasses decide how it shades the metal."""

    def __init__(self, rng: np.random.Generator, size: float, ratio: float, rim: float) -> None:
        self.psi = rng.uniform(0.0, math.pi)
        self.a = size / 2
        self.b = self.a * ratio
        self.rim = rim
        self.ex, self.ey = _ellipse_extent(self.a + rim, self.b + rim, self.psi)

    def _polar(self, xs: FloatArray, ys: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Coordinates along the ellipse axes, scaled so the ellipse is the unit circle."""
        c, s = math.cos(self.psi), math.sin(self.psi)
        return (xs * c + ys * s) / self.a, (-xs * s + ys * c) / self.b


class _Dent(_Round):
    """Concave: the slope of z = -(1 - r^2)^1.5 lit from one side, over a slightly darker floor."""

    cls = 1

    def __init__(self, rng: np.random.Generator, size: float, light: float) -> None:
        super().__init__(rng, size, rng.uniform(0.5, 0.9), 0.0)
        self.tone = rng.uniform(0.16, 0.26)
        self.light = light

    def _paint(self, patch: FloatArray, xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        u, v = self._polar(xs, ys)
        inside = np.clip(1.0 - u * u - v * v, 0.0, 1.0)
        slope = 3.0 * np.sqrt(inside) / 1.5  # 1.5 = max of 3 r sqrt(1 - r^2)
        facing = u * math.cos(self.light - self.psi) + v * math.sin(self.light - self.psi)
        delta = self.tone * slope * facing - 0.04 * inside
        patch += delta
        changed: npt.NDArray[np.bool_] = np.abs(delta) > 0.012
        return changed


class _Hole(_Round):
    """Perforation: a near-black ellipse inside a thin bright rim."""

    cls = 2

    def __init__(self, rng: np.random.Generator, size: float) -> None:
        ratio = rng.uniform(0.75, 1.0)
        super().__init__(rng, size, ratio, max(1.2, rng.uniform(0.06, 0.12) * size / 2))
        self.tone = rng.uniform(0.02, 0.07)

    def _paint(self, patch: FloatArray, xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        u, v = self._polar(xs, ys)
        r = np.sqrt(u * u + v * v)
        scale = math.sqrt(self.a * self.b)
        hole = _aa((1.0 - r) * scale)
        ring = _aa((1.0 - r) * scale + self.rim) * (1 - hole)
        patch[:] = patch * (1 - hole - ring) + self.tone * hole + 0.95 * ring
        return (hole + ring) > 0.25


def _make_defect(rng: np.random.Generator, cls: int, size: float, light: float) -> _Defect:
    """The defect of class `cls` whose largest extent is about `size` pixels."""
    if cls == 0:
        return _Tear(rng, size)
    if cls == 1:
        return _Dent(rng, size, light)
    return _Hole(rng, size)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """A random (width, height) with sides in range and a camera-like aspect ratio."""
    aspect = float(rng.choice(_ASPECTS))
    lo = max(_SIDE_MIN, _SIDE_MIN / aspect)
    hi = min(_SIDE_MAX, _SIDE_MAX / aspect)
    height = int(rng.uniform(lo, hi))
    return int(round(height * aspect)), height


def render_sample(rng: np.random.Generator, width: int | None = None, height: int | None = None) -> Sample:
    """Render one inspection image of a metal part with 0-4 labelled defects."""
    if width is None or height is None:
        rw, rh = _image_size(rng)
        width = rw if width is None else width
        height = rh if height is None else height
    if width < 16 or height < 16:
        raise ValueError(f"image size {width}x{height} is too small (min 16x16)")
    img = _metal(rng, height, width)
    light = rng.uniform(0.0, 2 * math.pi)
    short = min(width, height)
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, 5))

    boxes: list[Box] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(count):
        cls = int(rng.integers(0, len(CLASSES)))
        lo, hi = _SIZE_RANGE[cls]
        defect = _make_defect(rng, cls, rng.uniform(lo, hi) * short, light)
        if 2 * defect.ex + 4 >= width or 2 * defect.ey + 4 >= height:
            continue
        for _ in range(_PLACE_TRIES):
            cx = rng.uniform(defect.ex + 2, width - defect.ex - 2)
            cy = rng.uniform(defect.ey + 2, height - defect.ey - 2)
            extent = (cx - defect.ex, cy - defect.ey, cx + defect.ex, cy + defect.ey)
            if all(_iou(extent, other) < _MAX_IOU for other in placed):
                break
        else:
            continue
        box = defect.draw(img, cx, cy)
        if box is not None:
            placed.append(extent)
            boxes.append(box)

    gain = rng.uniform(0.8, 1.2)
    gamma = rng.uniform(0.8, 1.25)
    lit = np.clip(img * _illumination(rng, height, width) * gain, 0.0, 1.0) ** gamma
    tint = np.asarray(_TINTS[int(rng.integers(0, len(_TINTS)))], dtype=np.float32)
    tint = tint * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(0.004, 0.025)
    rgb = (lit + noise)[:, :, None] * tint
    pixels = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Sample(Image.fromarray(pixels, "RGB"), tuple(boxes))


def _yolo_lines(boxes: tuple[Box, ...], width: int, height: int) -> str:
    """YOLO label text: one `cls xc yc w h` line per box, normalised to the display size."""
    lines = []
    for b in boxes:
        xc, yc = (b.x1 + b.x2) / 2 / width, (b.y1 + b.y2) / 2 / height
        bw, bh = (b.x2 - b.x1) / width, (b.y2 - b.y1) / height
        lines.append(f"{b.cls} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}\n")
    return "".join(lines)


def _save(image: Image.Image, stem: Path, kind: str, orientation: int) -> None:
    """Save in one of the file flavours real uploads come in."""
    if kind == "gray":
        image.convert("L").save(stem.with_suffix(".png"), "PNG")
    elif kind == "rgba":
        image.convert("RGBA").save(stem.with_suffix(".png"), "PNG")
    elif kind == "exif":
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        stored = image.transpose(_STORE[orientation])
        stored.save(stem.with_suffix(".jpg"), "JPEG", quality=90, exif=exif.tobytes())
    else:
        image.save(stem.with_suffix(".jpg"), "JPEG", quality=90)


def _is_ours(out: Path) -> bool:
    """Whether `out` holds a dataset this module wrote, identified by its data.yaml."""
    data = out / "data.yaml"
    if not data.is_file():
        return False
    with data.open(encoding="utf-8", errors="replace") as fh:
        return fh.readline().startswith(_MARKER)


def _prepare(out: Path) -> None:
    """Make `out` ready to write into, refusing to clobber anything we did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not _is_ours(out):
            raise ValueError(
                f"{out} is not empty and is not a labelloop synthetic dataset (no data.yaml "
                f"starting with {_MARKER!r}); refusing to overwrite it"
            )
        for sub in ("images", "labels"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
    for sub in ("images", "labels"):
        for split in ("train", "val"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)


def _plan(n: int, seed: int, val_fraction: float) -> tuple[list[str], list[str], list[int]]:
    """Split, file flavour and EXIF orientation per image, with exact proportions."""
    rng = np.random.default_rng([seed, 1])
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = set(rng.permutation(n)[:n_val].tolist())
    splits = ["val" if i in val else "train" for i in range(n)]
    kinds = [kind for kind, share in _FORMAT_SHARES for _ in range(round(n * share))]
    kinds += ["jpeg"] * (n - len(kinds))
    kinds = [kinds[i] for i in rng.permutation(n)]
    orientations = [int(o) for o in rng.choice(sorted(_STORE), size=n)]
    return splits, kinds, orientations


def write_dataset(out: Path, n: int = 240, seed: int = 0, val_fraction: float = 0.2) -> Path:
    """Write a deterministic Ultralytics YOLO dataset to `out` and return its data.yaml."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one train and one val image), got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out = Path(out).resolve()
    _prepare(out)
    splits, kinds, orientations = _plan(n, seed, val_fraction)
    width = max(5, len(str(n - 1)))
    for i in range(n):
        sample = render_sample(np.random.default_rng([seed, 0, i]))
        name = f"{i:0{width}d}"
        _save(sample.image, out / "images" / splits[i] / name, kinds[i], orientations[i])
        label = _yolo_lines(sample.boxes, *sample.image.size)
        (out / "labels" / splits[i] / f"{name}.txt").write_text(label, encoding="utf-8")

    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    data = out / "data.yaml"
    data.write_text(
        f"{_MARKER} (n={n}, seed={seed})\n"
        f"path: {json.dumps(str(out))}\n"
        "train: images/train\n"
        "val: images/val\n"
        f"nc: {len(CLASSES)}\n"
        f"names:\n{names}",
        encoding="utf-8",
    )
    logger.info("wrote %d synthetic images (%d val) to %s", n, splits.count("val"), out)
    return data
