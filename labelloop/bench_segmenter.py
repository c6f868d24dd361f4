"""``labelloop bench``'s segmenter section: the latency of one interactive click, end to end.

After the backbone section (the demo backbone published into the bench's private repository and
loaded into its tritonserver), a small segmenter head is trained on synthetic blob images
(``trainer.synthetic_blobs``, 20 foreground and 20 background points each, the backbone's tokens at
long side 448 through ``trainer.features.LocalBackbone``), exported, published as ``bench-segmenter``
and loaded. Then, per held-out image (JPEG quality 90): one plain call (the first: the backbone runs,
nothing is cached) and a sequence of clicks drawn from the true mask, each call carrying all clicks so
far, timed as the bridge does the work: ``SegmenterClient.predict_image`` (one gRPC request; the
tokens come from the head model's feature cache) and ``SegmentControls.answer`` (upsample the maps to
the image, honour the clicks, RLE). Label Studio's HTTP round trip is not included.

``interactive_click_p50_ms`` is the p50 over the click calls (target: at most 150 ms on 2 cores).

``python -m labelloop.bench_segmenter`` runs this section alone, in a tritonserver of its own holding
the demo backbone and the head.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError
from core.settings import Settings
from labelloop.bench_backbone import BACKBONE_NAME
from serving.repository import ModelRepository

__all__ = [
    "CLICKS",
    "LABEL_CONFIG",
    "LONG_SIDE",
    "SEGMENTER_NAME",
    "SegmenterBench",
    "SegmenterTally",
    "run_segmenter_bench",
    "segmenter_section",
    "train_bench_segmenter",
]

logger = logging.getLogger(__name__)

SEGMENTER_NAME = "bench-segmenter"
CLASSES = ("defect",)
LONG_SIDE = 448
TRAIN_IMAGES = 12
POINTS = 20  # foreground and background points per training image
MAX_EPOCHS = 30
CLICKS = 5
QUICK_IMAGES = 4
FULL_IMAGES = 8
WARMUP_IMAGES = 1
JPEG_QUALITY = 90
SEED = 7
TARGET_P50_MS = 150.0
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<KeyPointLabels name="points" toName="image" smart="true">'
    '<Label value="defect"/><Label value="background"/></KeyPointLabels>'
    '<BrushLabels name="mask" toName="image"><Label value="defect"/></BrushLabels></View>'
)


@dataclass
class SegmenterTally:
    """What the section measured: seconds per call, by kind, and how the head came to be."""

    first_s: list[float] = field(default_factory=list)
    click_s: list[float] = field(default_factory=list)
    # per click position (1-based): seconds, over the images
    by_click: dict[int, list[float]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train_s: float = 0.0
    measure_s: float = 0.0
    images: int = 0
    image_size: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _ClickImage:
    data: bytes
    labels: npt.NDArray[np.uint8]
    width: int
    height: int


def _dataset(work: Path, n: int) -> list[_ClickImage]:
    """``n`` synthetic blob images (PNG) and their label maps, in order."""
    from PIL import Image

    from trainer.synthetic_blobs import write_segmenter_dataset

    out = write_segmenter_dataset(work, n=n, seed=SEED, classes=CLASSES)
    found = []
    for path in sorted((out / "images").glob("*.png")):
        labels = np.asarray(Image.open(out / "masks" / path.name), dtype=np.uint8)
        found.append(_ClickImage(path.read_bytes(), labels, labels.shape[1], labels.shape[0]))
    return found


def _jpeg(data: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def train_bench_segmenter(
    settings: Settings, repo: ModelRepository, work: Path, backbone: str = BACKBONE_NAME
) -> tuple[int, list[_ClickImage], dict[str, Any]]:
    """Train, export and publish the bench's segmenter on ``TRAIN_IMAGES`` blob images; the published
    version, the held-out images for the clicks (``FULL_IMAGES`` + warm-up) and what the head is."""
    try:
        from trainer.features import LocalBackbone
        from trainer.segment import HeadParams, SegmenterCheckpoint, cell_points, export_head_onnx, train_head
        from trainer.synthetic_blobs import sample_points
    except ImportError as exc:
        raise ConfigError("the segmenter section needs torch: pip install 'labelloop[train]'") from exc
    from serving.heads import publish_head
    from serving.pbtxt import SegmenterConfig
    from serving.repository import ModelCard

    started = time.perf_counter()
    images = _dataset(work / "blobs", TRAIN_IMAGES + WARMUP_IMAGES + FULL_IMAGES)
    train, held_out = images[:TRAIN_IMAGES], images[TRAIN_IMAGES:]
    local = LocalBackbone(repo, backbone, max_image_bytes=settings.max_image_bytes)
    rng = np.random.default_rng(SEED)
    tokens, points = [], []
    for image in train:
        grid = local.features(image.data, LONG_SIDE)
        tokens.append(grid)
        pixels = sample_points(image.labels, POINTS, POINTS, rng)
        points.append(cell_points(pixels, image.width, image.height, int(grid.shape[0]), int(grid.shape[1])))
    result = train_head(tokens, points, CLASSES, HeadParams(max_epochs=MAX_EPOCHS, seed=SEED))
    onnx = export_head_onnx(result.head, work / "head" / "model.onnx")
    weights = SegmenterCheckpoint.from_head(result.head, CLASSES).save(work / "head" / "weights.pt")
    card = ModelCard(
        name=SEGMENTER_NAME,
        version=0,
        classes=list(CLASSES),
        imgsz=LONG_SIDE,
        kind="segmenter",
        train_args={"epochs": result.epochs, "images": len(train), "points_per_image": 2 * POINTS},
        note="labelloop bench: synthetic blobs",
        backbone=local.name,
        backbone_version=local.version,
    )
    config = SegmenterConfig(
        name=SEGMENTER_NAME, backbone=local.name, classes=CLASSES, intra_op_threads=max(1, settings.ort_threads)
    )
    version = publish_head(repo, card, onnx, config, weights)
    model = {
        "name": SEGMENTER_NAME,
        "version": version,
        "backbone": f"{local.name} v{local.version}",
        "long_side": LONG_SIDE,
        "train_images": len(train),
        "epochs": result.epochs,
        "train_s": round(time.perf_counter() - started, 1),
    }
    return version, [_ClickImage(_jpeg(i.data), i.labels, i.width, i.height) for i in held_out], model


def _context(clicks: list[tuple[float, float, int]], width: int, height: int) -> list[dict[str, Any]]:
    """Label Studio's ``keypointlabels`` results for pixel clicks (class -1: the background label)."""
    return [
        {
            "id": f"click{n}",
            "type": "keypointlabels",
            "from_name": "points",
            "to_name": "image",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": 100.0 * x / width,
                "y": 100.0 * y / height,
                "width": 0.5,
                "keypointlabels": [CLASSES[k] if k >= 0 else "background"],
            },
        }
        for n, (x, y, k) in enumerate(clicks)
    ]


class SegmenterBench:
    """Plain calls and click sequences on the held-out images, timed as the bridge does the work."""

    def __init__(self, images: list[_ClickImage], count: int, model: dict[str, Any]) -> None:
        from ls_bridge.segments import segment_controls

        if len(images) < WARMUP_IMAGES + count:
            raise ValueError(f"{len(images)} images for {WARMUP_IMAGES} warm-up and {count} measured")
        self.warmup, self.images = images[:WARMUP_IMAGES], images[WARMUP_IMAGES : WARMUP_IMAGES + count]
        (self.control,) = segment_controls(LABEL_CONFIG)
        self.tally = SegmenterTally(model=dict(model), images=count)
        self.tally.image_size = (images[0].width, images[0].height)

    def _sequence(self, image: _ClickImage, seed: int) -> list[tuple[float, float, int]]:
        """``CLICKS`` clicks from the true mask: foreground first, then alternating with background."""
        from trainer.synthetic_blobs import sample_points

        rng = np.random.default_rng([SEED, seed])
        fg = sample_points(image.labels, CLICKS, 0, rng)
        bg = sample_points(image.labels, 0, CLICKS, rng)
        order = [fg[0]] + [p for pair in zip(bg, fg[1:], strict=False) for p in pair]
        return (order + fg + bg)[:CLICKS]

    async def _call(self, client: Any, image: _ClickImage, clicks: list[tuple[float, float, int]]) -> float:
        from ls_bridge.heads import HeadRequest

        started = time.perf_counter()
        request = HeadRequest(context=_context(clicks, image.width, image.height))
        fractions = self.control.clicks(request.context, CLASSES)
        output = await client.predict_image(image.data, fractions)
        results, _ = self.control.answer(output, request)
        elapsed = time.perf_counter() - started
        if clicks and not results:
            raise AssertionError("an interactive call answered no mask")
        return elapsed

    async def _image(self, client: Any, image: _ClickImage, seed: int, counted: bool) -> None:
        first = await self._call(client, image, [])
        sequence = self._sequence(image, seed)
        times = [await self._call(client, image, sequence[: n + 1]) for n in range(len(sequence))]
        if counted:
            self.tally.first_s.append(first)
            self.tally.click_s += times
            for n, t in enumerate(times, 1):
                self.tally.by_click.setdefault(n, []).append(t)

    async def measure(self, url: str, repo: ModelRepository, timeout_s: float = 120.0) -> None:
        """Load the head into the running Triton (its backbone must be loaded), warm up, then measure."""
        from serving.control import load_served_version
        from serving.heads import SegmenterClient

        started = time.perf_counter()
        client = SegmenterClient(url, SEGMENTER_NAME, timeout_s=max(timeout_s, 120.0), retries=0)
        try:
            info = await load_served_version(client, repo)
            self.tally.model["provider"] = info.provider
            for k, image in enumerate(self.warmup):
                await self._image(client, image, 1000 + k, counted=False)
            for k, image in enumerate(self.images):
                await self._image(client, image, k, counted=True)
        finally:
            await client.close()
        self.tally.measure_s = time.perf_counter() - started


def segmenter_section(tally: SegmenterTally) -> dict[str, Any]:
    """The section as JSON: click latency percentiles (ms), the first call's mean and the head."""
    clicks = np.asarray(tally.click_s) * 1e3
    first = np.asarray(tally.first_s) * 1e3
    p50 = round(float(np.percentile(clicks, 50)), 2) if clicks.size else None
    return {
        "model": tally.model,
        "images": tally.images,
        "image_size": list(tally.image_size),
        "clicks_per_image": CLICKS,
        "interactive_click_p50_ms": p50,
        "interactive_click_p90_ms": round(float(np.percentile(clicks, 90)), 2) if clicks.size else None,
        "interactive_click_max_ms": round(float(clicks.max()), 2) if clicks.size else None,
        "interactive_click_n": int(clicks.size),
        "first_call_mean_ms": round(float(first.mean()), 2) if first.size else None,
        "first_call_max_ms": round(float(first.max()), 2) if first.size else None,
        "click_p50_ms_by_position": {
            str(n): round(float(np.percentile(np.asarray(v) * 1e3, 50)), 2) for n, v in sorted(tally.by_click.items())
        },
        "target_p50_ms": TARGET_P50_MS,
        "target_met": p50 is not None and p50 <= TARGET_P50_MS,
        "train_s": tally.model.get("train_s"),
        "measure_s": round(tally.measure_s, 1),
        "timed": "SegmenterClient.predict_image (gRPC, Triton: head + feature cache, or backbone by BLS on the "
        "first call) + SegmentControls.answer (upsample, honour clicks, RLE); no HTTP to Label Studio",
    }


def run_segmenter_bench(settings: Settings, images: int = QUICK_IMAGES) -> dict[str, Any]:
    """The segmenter section alone: its own tritonserver holding the demo backbone and the head."""
    from labelloop.bench_backbone import publish_demo_backbone
    from labelloop.bench_rig import machine_info, start_private_triton
    from serving.backbone import FeaturesClient
    from serving.control import load_served_version

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="labelloop-bench-segmenter-") as tmp:
        root = Path(tmp)
        repo = ModelRepository(root / "model_repository")
        publish_demo_backbone(settings, repo, root / "backbone")
        version, held_out, model = train_bench_segmenter(settings, repo, root / "segmenter")
        triton = start_private_triton(settings, repo.root, root / "triton", "bench-segmenter-triton.log")
        try:

            async def load_backbone() -> None:
                client = FeaturesClient(triton.grpc_url, BACKBONE_NAME, timeout_s=120.0, retries=0)
                try:
                    await load_served_version(client, repo)
                finally:
                    await client.close()

            asyncio.run(load_backbone())
            bench = SegmenterBench(held_out, images, model)
            asyncio.run(bench.measure(triton.grpc_url, repo, settings.triton_timeout_s))
        finally:
            triton.stop()
    machine = machine_info() | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    return {"machine": machine, "segmenter": segmenter_section(bench.tally)}


def main(argv: list[str] | None = None) -> int:
    """``python -m labelloop.bench_segmenter``: the segmenter section alone; markdown on stdout."""
    from core.settings import load_settings
    from labelloop.bench_report import segmenter_lines

    parser = argparse.ArgumentParser(prog="python -m labelloop.bench_segmenter", description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images (the full run: {FULL_IMAGES})")
    parser.add_argument("--json", type=Path, help="write the section as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run_segmenter_bench(load_settings(), QUICK_IMAGES if args.quick else FULL_IMAGES)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    load = report["machine"]
    print(f"Load average {load['load_average_before'][0]:.2f} before, {load['load_average_after'][0]:.2f} after.\n")
    print("\n".join(segmenter_lines(report["segmenter"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
