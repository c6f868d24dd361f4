"""Synthetic surface-inspection images, one class per image, so the classifier has demo data.

Each class is a texture family drawn over the detector generator's brushed metal (``trainer.synthetic``),
under the same random light, tint, gamma and noise, at random sizes (224-640 px) and aspects. Classes
are told apart by texture statistics (thin lines, dark dots, colour blotches, plain metal, ...), which
is what pooled statistics of a frozen random-init ViT's tokens can separate; density, contrast,
orientation and colour vary within a class so that the task is not trivial.

Class names are labels only: the i-th class gets texture family ``i mod len(FAMILIES)``, so any list
of names works; the first four families are the default ``CLASSES``, in order, then crazing
(``cracked``) and rust (``corroded``). With more classes than families, class i also gets variant
``i // len(FAMILIES)``: its family's characteristic size is scaled by ``2 ** variant`` (wider
scratches and cracks, bigger pits, flakes and grains; stains split into smaller, more numerous
blotches; clean metal gets a matte grain), so two classes that share a family stay distinct.

Sizes are in pixels of the image resized to a long side of 448 (the backbone default), so features
cover the same share of a 16 px patch at any image size. Held-out accuracy of ``trainer.classify``'s
head on the demo backbone (60 train / 40 test): see ``trainer/classify.py``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from trainer.synthetic import _TINTS, _illumination, _image_size, _metal

__all__ = ["CLASSES", "FAMILIES", "render_class_image", "write_classifier_dataset"]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("scratched", "pitted", "stained", "clean")

FloatArray = npt.NDArray[np.float32]
# A family paints into the grey albedo (h, w) and the RGB colour factor (h, w, 3), in place.
Painter = Callable[[np.random.Generator, FloatArray, FloatArray, float], None]

_MARKER = ".labelloop-synthetic-classes"
# Pixel sizes below are at this long side (the backbone's default): a feature keeps its size in
# 16 px patches whatever the image size, instead of thinning to nothing when a 640 px image shrinks.
_REFERENCE_SIDE = 448
_SUPERSAMPLE = 2
_PNG_SHARE = 0.25
# Multiplicative RGB of discolouration: rust-brown, heat-tint blue, patina green, oil-yellow. The
# random-init backbone's LayerNorm hides brightness, so a stain must change the hue, not only darken.
_STAIN_HUES = ((0.78, 0.6, 0.42), (0.62, 0.72, 0.98), (0.6, 0.82, 0.68), (0.92, 0.85, 0.5))
_RUST = (1.0, 0.58, 0.32)


def _mask(h: int, w: int, draw: Callable[[ImageDraw.ImageDraw, int], None]) -> FloatArray:
    """Anti-aliased coverage in [0, 1] of shapes drawn at `_SUPERSAMPLE` times the size."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (w * k, h * k), 0)
    draw(ImageDraw.Draw(canvas), k)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _lowfreq(rng: np.random.Generator, h: int, w: int, cell: float) -> FloatArray:
    """Smooth noise with features about `cell` pixels across, for irregular blob outlines."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    coarse = Image.fromarray(rng.standard_normal((gh, gw), dtype=np.float32), "F")
    return np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _blobs(rng: np.random.Generator, h: int, w: int, count: int, size: float) -> FloatArray:
    """Soft irregular blobs in [0, 1]: Gaussians of about `size` px whose edges noise roughens."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    field = np.zeros((h, w), dtype=np.float32)
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        sx, sy = size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4)
        field += np.exp(-(((xs - cx) / sx) ** 2) - ((ys - cy) / sy) ** 2)
    field += 0.35 * _lowfreq(rng, h, w, size / 2)
    blobs: FloatArray = np.clip((field - 0.45) * 4.0, 0.0, 1.0).astype(np.float32)
    return blobs


def _unit(h: int, w: int, scale: float) -> float:
    """Image pixels per reference pixel, times the variant's scale."""
    return scale * max(h, w) / _REFERENCE_SIDE


def _scratched(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Thin straight lines, bright or dark, around one dominant direction with a random spread."""
    h, w = albedo.shape
    short, unit = min(h, w), _unit(h, w, scale)
    theta0, spread = rng.uniform(0.0, math.pi), rng.uniform(0.8, 2.0)
    count = int(rng.integers(25, 70))
    bright_share = rng.uniform(0.0, 1.0)
    lines = []
    for _ in range(count):
        theta = theta0 + rng.normal(0.0, spread)
        length = rng.uniform(0.3, 1.0) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        dx, dy = math.cos(theta) * length / 2, math.sin(theta) * length / 2
        lines.append(((cx - dx, cy - dy, cx + dx, cy + dy), rng.uniform(1.0, 2.2) * unit, rng.random() < bright_share))
    for bright in (True, False):

        def draw(d: ImageDraw.ImageDraw, k: int, bright: bool = bright) -> None:
            for (x0, y0, x1, y1), width, is_bright in lines:
                if is_bright == bright:
                    d.line([(x0 * k, y0 * k), (x1 * k, y1 * k)], fill=255, width=max(1, round(width * k)))

        cover = _mask(h, w, draw)
        tone = rng.uniform(0.85, 1.0) if bright else rng.uniform(0.05, 0.2)
        albedo[:] = albedo * (1 - cover) + tone * cover


def _pitted(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Small dark round pits, spread evenly or in clusters, each with a lit edge on one side."""
    h, w = albedo.shape
    unit = _unit(h, w, scale)
    density = rng.uniform(6.0, 18.0) / unit**2  # pits per 10,000 reference px
    count = max(8, int(density * h * w / 10_000))
    if rng.random() < 0.5:
        centres = rng.uniform((0, 0), (w, h), size=(count, 2))
    else:
        seeds = rng.uniform((0, 0), (w, h), size=(int(rng.integers(4, 10)), 2))
        spread = rng.uniform(0.05, 0.15) * min(h, w)
        centres = seeds[rng.integers(0, len(seeds), count)] + rng.normal(0.0, spread, (count, 2))
    radii = rng.uniform(2.0, 4.5, count) * unit
    light = rng.uniform(0.0, 2 * math.pi)
    ox, oy = math.cos(light), math.sin(light)

    def pits(offset: float) -> Callable[[ImageDraw.ImageDraw, int], None]:
        def draw(d: ImageDraw.ImageDraw, k: int) -> None:
            for (cx, cy), r in zip(centres, radii, strict=True):
                x, y = cx + ox * r * offset, cy + oy * r * offset
                d.ellipse([(x - r) * k, (y - r) * k, (x + r) * k, (y + r) * k], fill=255)

        return draw

    rim = _mask(h, w, pits(0.35))
    hole = _mask(h, w, pits(0.0))
    rim = np.clip(rim - hole, 0.0, 1.0)
    albedo[:] = albedo * (1 - hole) * (1 - rim) + rng.uniform(0.04, 0.18) * hole + rng.uniform(0.8, 0.95) * rim


def _stained(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Discoloured, darker blotches (rust, heat tint, patina, oil) with a darker rim."""
    h, w = albedo.shape
    size = rng.uniform(0.1, 0.25) * min(h, w) / scale
    count = int(rng.integers(4, 10) * scale**2)
    stain = _blobs(rng, h, w, count, size)
    edge = stain * (1 - stain) * 4.0  # peaks where a blotch fades out
    hue = np.asarray(_STAIN_HUES[int(rng.integers(0, len(_STAIN_HUES)))], dtype=np.float32)
    strength = rng.uniform(0.55, 0.9)
    colour *= 1.0 - (strength * stain)[:, :, None] * (1.0 - hue)
    albedo *= 1.0 - rng.uniform(0.15, 0.35) * stain - rng.uniform(0.1, 0.3) * edge


def _clean(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Defect-free metal: the brushing alone; variants (``scale`` > 1) get a matte, blasted grain of that size."""
    if scale > 1:
        h, w = albedo.shape
        albedo += rng.uniform(0.03, 0.06) * _lowfreq(rng, h, w, 1.5 * _unit(h, w, scale))


def _cracked(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Crazing: fine dark cracks around irregular polygonal flakes of slightly different brightness, all over.

    The cracks are the edges of a Voronoi diagram of jittered grid points (each pixel compares the
    points of its 3x3 neighbouring cells), bent by smooth noise so the edges wander.
    """
    h, w = albedo.shape
    unit = _unit(h, w, scale)
    cell = rng.uniform(18.0, 36.0) * unit
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    px = (gx - 1 + rng.uniform(0.1, 0.9, (gh, gw))) * cell
    py = (gy - 1 + rng.uniform(0.1, 0.9, (gh, gw))) * cell
    bend = rng.uniform(0.05, 0.2) * cell
    xs = np.arange(w, dtype=np.float32)[None, :] + bend * _lowfreq(rng, h, w, cell)
    ys = np.arange(h, dtype=np.float32)[:, None] + bend * _lowfreq(rng, h, w, cell)
    ci = np.clip((ys / cell).astype(np.int64) + 1, 1, gh - 2)
    cj = np.clip((xs / cell).astype(np.int64) + 1, 1, gw - 2)
    offsets = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    near = np.stack([np.hypot(xs - px[ci + di, cj + dj], ys - py[ci + di, cj + dj]) for di, dj in offsets])
    owner = near.argmin(axis=0)
    near.partition(1, axis=0)
    gap = (near[1] - near[0]) / 2  # about the distance to the nearest cell edge
    # Each flake sits at its own tilt, so it catches the light a little differently.
    shade = rng.normal(0.0, rng.uniform(0.04, 0.1), (gh, gw)).astype(np.float32)
    di = np.asarray([o[0] for o in offsets])[owner]
    dj = np.asarray([o[1] for o in offsets])[owner]
    albedo += shade[ci + di, cj + dj]
    width = rng.uniform(1.6, 3.0) * unit
    cover = np.clip(width - gap + 0.5, 0.0, 1.0)
    albedo[:] = albedo * (1 - cover) + rng.uniform(0.03, 0.15) * cover


def _corroded(rng: np.random.Generator, albedo: FloatArray, colour: FloatArray, scale: float) -> None:
    """Rough orange-brown patches: coarse speckle under a rust colour."""
    h, w = albedo.shape
    patches = _blobs(rng, h, w, int(rng.integers(4, 9)), rng.uniform(0.08, 0.18) * min(h, w))
    speckle = _lowfreq(rng, h, w, 1.5 * _unit(h, w, scale))
    albedo += patches * rng.uniform(0.08, 0.2) * speckle
    rust = np.asarray(_RUST, dtype=np.float32)
    colour *= 1.0 - (rng.uniform(0.4, 0.85) * patches)[:, :, None] * (1.0 - rust)


FAMILIES: tuple[Painter, ...] = (_scratched, _pitted, _stained, _clean, _cracked, _corroded)


def render_class_image(rng: np.random.Generator, index: int) -> Image.Image:
    """One RGB image of class `index`: texture family ``index mod len(FAMILIES)`` over lit metal."""
    family, variant = index % len(FAMILIES), index // len(FAMILIES)
    width, height = _image_size(rng)
    albedo = _metal(rng, height, width)
    colour = np.ones((height, width, 3), dtype=np.float32)
    FAMILIES[family](rng, albedo, colour, 2.0**variant)
    gain, gamma = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.25)
    lit = np.clip(albedo * _illumination(rng, height, width) * gain, 0.0, 1.0) ** gamma
    tint = np.asarray(_TINTS[int(rng.integers(0, len(_TINTS)))], dtype=np.float32)
    tint = tint * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(0.004, 0.025)
    rgb = (lit + noise)[:, :, None] * tint * colour
    return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _prepare(out: Path) -> None:
    """Make `out` ready to write into; refuse a non-empty folder that this module did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise ValueError(
                f"{out} is not empty and is not a synthetic class dataset (no {_MARKER}); refusing to overwrite it"
            )
        shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by trainer.synthetic_classes; rewritten in place\n", encoding="utf-8")


def write_classifier_dataset(out: Path, n: int, seed: int, classes: Sequence[str] = CLASSES) -> Path:
    """Write `n` images with balanced classes to ``out/images`` and their labels to ``out/labels.json``.

    Deterministic for a seed. Class counts differ by at most one; which image gets which class is
    shuffled, and file names (``00000.jpg``, ``00001.png``, ...) do not reveal it. About a quarter
    are PNG, the rest JPEG. A marker file lets a later call rewrite the folder; any other non-empty
    folder is refused.
    """
    names = list(classes)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"classes must be a non-empty list of distinct names, got {names}")
    if n < len(names):
        raise ValueError(f"n must be at least the number of classes ({len(names)}), got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out = Path(out).resolve()
    _prepare(out)
    plan = np.random.default_rng([seed, 1])
    assigned = plan.permutation(np.arange(n) % len(names))
    png = set(plan.permutation(n)[: round(n * _PNG_SHARE)].tolist())
    digits = max(5, len(str(n - 1)))
    labels: dict[str, str] = {}
    for i, cls in enumerate(assigned.tolist()):
        image = render_class_image(np.random.default_rng([seed, 0, i]), cls)
        name = f"{i:0{digits}d}." + ("png" if i in png else "jpg")
        image.save(out / "images" / name, quality=90)  # the format follows the suffix; PNG ignores quality
        labels[name] = names[cls]
    text = json.dumps({"classes": names, "labels": labels}, indent=1)
    (out / "labels.json").write_text(text + "\n", encoding="utf-8")
    logger.info("wrote %d synthetic class images (%d classes) to %s", n, len(names), out)
    return out
