"""Synthetic defect masks on metal, so the segmenter has demo data with exact per-pixel truth.

Each image is the detector generator's brushed metal (``trainer.synthetic``) under its random light,
tint, gamma and noise, with one to three irregular blobs (a stretched, rotated Gaussian whose outline
smooth noise bends, thresholded). Class k paints its blobs with its own texture: a discolouration
hue (``trainer.synthetic_classes``' stain hues, in order), a darker albedo and a speckle whose grain
grows with ``k // 4``. Strength, grain contrast and blob size vary per blob, and brightness per
image, so the task is not trivial. Blob sizes are set at the 448 px reference long side, so blobs
keep their size in 16 px patches at any image size.

``sample_points`` draws pixel points from a true mask as a person would click them: foreground points
inside each present class's blobs, background points outside.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from trainer.synthetic import _TINTS, _illumination, _metal
from trainer.synthetic_classes import _REFERENCE_SIDE, _STAIN_HUES, _lowfreq

__all__ = ["render_blob_image", "sample_points", "write_segmenter_dataset"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
LabelMap = npt.NDArray[np.uint8]

_MARKER = ".labelloop-synthetic-blobs"
_MAX_CLASSES = 254  # label maps are uint8 with 0 for background


def _blob(rng: np.random.Generator, h: int, w: int, unit: float) -> npt.NDArray[np.bool_]:
    """One irregular smooth blob: a rotated elliptic Gaussian plus low-frequency noise, thresholded."""
    radius = rng.uniform(28.0, 80.0) * unit
    cx, cy = rng.uniform(0.12, 0.88) * w, rng.uniform(0.12, 0.88) * h
    theta = rng.uniform(0.0, math.pi)
    ratio = rng.uniform(0.45, 1.0)
    ys = np.arange(h, dtype=np.float32)[:, None] - cy
    xs = np.arange(w, dtype=np.float32)[None, :] - cx
    along = xs * math.cos(theta) + ys * math.sin(theta)
    across = -xs * math.sin(theta) + ys * math.cos(theta)
    field = np.exp(-((along / radius) ** 2) - (across / (radius * ratio)) ** 2)
    # Noise scales the Gaussian (not added to it), so it bends the outline without seeding stray specks.
    field *= 1.0 + rng.uniform(0.3, 0.6) * _lowfreq(rng, h, w, radius * 0.6)
    return np.asarray(field > 0.5)


def _soften(mask: npt.NDArray[np.bool_]) -> FloatArray:
    """Coverage in [0, 1] with a one-pixel ramp, so blob edges are not aliased steps."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    w, h = image.size
    small = image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def render_blob_image(
    rng: np.random.Generator, num_classes: int, width: int, height: int
) -> tuple[Image.Image, LabelMap]:
    """One RGB image with 1-3 blobs of random classes and its label map (0 background, k + 1 class k)."""
    unit = max(width, height) / _REFERENCE_SIDE
    albedo = _metal(rng, height, width)
    colour = np.ones((height, width, 3), dtype=np.float32)
    labels = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, num_classes))
        mask = _blob(rng, height, width, unit)
        if not mask.any():
            continue
        cover = _soften(mask)
        grain = (2.0 + 2.0 * (k // len(_STAIN_HUES))) * unit * rng.uniform(0.8, 1.25)
        speckle = rng.uniform(0.14, 0.24) * _lowfreq(rng, height, width, grain)
        texture = albedo * rng.uniform(0.55, 0.8) + speckle
        albedo[:] = albedo * (1 - cover) + texture * cover
        hue = np.asarray(_STAIN_HUES[k % len(_STAIN_HUES)], dtype=np.float32)
        strength = rng.uniform(0.5, 0.85)
        colour *= 1.0 - (strength * cover)[:, :, None] * (1.0 - hue)
        labels[mask] = k + 1
    gain, gamma = rng.uniform(0.75, 1.25), rng.uniform(0.8, 1.25)
    lit = np.clip(albedo * _illumination(rng, height, width) * gain, 0.0, 1.0) ** gamma
    tint = np.asarray(_TINTS[int(rng.integers(0, len(_TINTS)))], dtype=np.float32)
    tint = tint * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(0.005, 0.03)
    rgb = (lit + noise)[:, :, None] * tint * colour
    image = Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image, labels


def sample_points(
    label_map: npt.NDArray[np.integer[Any]], n_fg: int, n_bg: int, rng: np.random.Generator
) -> list[tuple[float, float, int]]:
    """(x, y, class_index) pixel-centre points from a true mask: ``n_fg`` in blobs, ``n_bg`` outside (-1).

    Foreground points are shared as evenly as possible among the classes present (the remainder goes
    to randomly chosen classes) and drawn uniformly inside each class's pixels, without repeats while
    pixels last. An image without foreground gets background points only; one without background,
    foreground only.
    """
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {labels.shape}")
    if n_fg < 0 or n_bg < 0:
        raise ValueError("point counts must be non-negative")
    present = [int(v) for v in np.unique(labels) if v > 0]
    counts = dict.fromkeys(present, 0)
    if present:
        base, extra = divmod(n_fg, len(present))
        lucky = set(rng.choice(present, size=extra, replace=False).tolist()) if extra else set()
        counts = {v: base + (v in lucky) for v in present}
    points: list[tuple[float, float, int]] = []
    for value, count in [*counts.items(), (0, n_bg)]:
        ys, xs = np.nonzero(labels == value)
        if count == 0 or ys.size == 0:
            continue
        pick = rng.choice(ys.size, size=count, replace=count > ys.size)
        cls = value - 1 if value > 0 else -1
        points.extend((float(xs[i]) + 0.5, float(ys[i]) + 0.5, cls) for i in pick.tolist())
    return points


def _prepare(out: Path) -> None:
    """Make `out` ready to write into; refuse a non-empty folder that this module did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise ValueError(
                f"{out} is not empty and is not a synthetic blob dataset (no {_MARKER}); refusing to overwrite it"
            )
        shutil.rmtree(out / "images", ignore_errors=True)
        shutil.rmtree(out / "masks", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by trainer.synthetic_blobs; rewritten in place\n", encoding="utf-8")


def write_segmenter_dataset(
    out: Path,
    n: int = 60,
    seed: int = 0,
    classes: Sequence[str] = ("defect",),
    size: tuple[int, int] = (448, 336),
) -> Path:
    """Write ``n`` images (``out/images/*.png``), their label maps (``out/masks/*.png``) and ``out/labels.json``.

    ``size`` is (width, height). A label map is a uint8 PNG: 0 background, k + 1 for ``classes[k]``.
    ``labels.json`` is ``{"classes": [...], "images": {"00000.png": {"mask": "masks/00000.png"}}}``.
    Deterministic for a seed; a marker file lets a later call rewrite the folder, any other non-empty
    folder is refused.
    """
    names = list(classes)
    if not names or len(set(names)) != len(names) or len(names) > _MAX_CLASSES:
        raise ValueError(f"classes must be 1-{_MAX_CLASSES} distinct names, got {names}")
    width, height = size
    if n < 1 or seed < 0 or width < 16 or height < 16:
        raise ValueError(f"need n >= 1, seed >= 0 and sides >= 16, got n={n}, seed={seed}, size={size}")
    out = Path(out).resolve()
    _prepare(out)
    digits = max(5, len(str(n - 1)))
    images: dict[str, dict[str, str]] = {}
    for i in range(n):
        image, labels = render_blob_image(np.random.default_rng([seed, 2, i]), len(names), width, height)
        name = f"{i:0{digits}d}.png"
        image.save(out / "images" / name)
        Image.fromarray(labels, "L").save(out / "masks" / name)
        images[name] = {"mask": f"masks/{name}"}
    text = json.dumps({"classes": names, "images": images}, indent=1)
    (out / "labels.json").write_text(text + "\n", encoding="utf-8")
    logger.info("wrote %d synthetic blob images (%d classes) to %s", n, len(names), out)
    return out
