"""``labelloop bench``: the serving path against the raw compute and the seed's approach, in one run.

The same images go through the same model version four ways, measured in rounds whose blocks
run in a fresh shuffled order each round, so background load and warm caches hit every method alike:

(a) raw      ``onnxruntime.InferenceSession.run`` on the float32 tensor the Triton model builds for
             the image (the compute floor: decode, letterbox and NMS are done outside the timer);
(b) triton   ``DetectorClient.detect(jpeg bytes)``: one gRPC request on a kept-alive channel,
             decode + letterbox + onnxruntime + NMS inside Triton, boxes back;
(c) bridge   ``POST /predict`` with Label Studio-shaped tasks whose images come from a loopback
             HTTP server: fetch, Triton, Label Studio regions, JSON;
(d) seed     ``YOLO(weights.pt).predict`` in-process, one image at a time (the model loaded once,
             torch on the threads ultralytics chooses).

Two side measurements: Triton at a score threshold of 0 (NMS's worst case, bounded by its
candidate cap), and ``fast_jpeg_decode`` on and off on camera-sized JPEGs (decode time and how
well the detections agree), in-process on the served ONNX. After the detector's rounds, the demo
DINOv3 backbone is measured the same way, Triton against raw onnxruntime (:mod:`labelloop.bench_backbone`).

Ratios and their definitions live in :mod:`labelloop.bench_report`. Module-level imports stay light
(``labelloop --help`` loads this module): numpy, httpx, gRPC and the runtimes load inside the bench.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.models import CommandInfo

from core.console import fail
from core.errors import ConfigError, InferenceError, LabelloopError
from core.settings import Settings, load_settings
from labelloop.bench_learning import learning
from labelloop.bench_rig import (
    FULL,
    JPEG_QUALITY,
    QUICK,
    BenchImage,
    BenchPlan,
    ProcessMonitor,
    Tally,
    label_config,
)

if TYPE_CHECKING:
    import httpx
    import numpy as np
    import numpy.typing as npt
    from tqdm import tqdm

    from serving.client import DetectorClient, ModelInfo
    from serving.repository import ModelRepository
    from serving.triton.detector_ops import Letterbox

    Tensor = npt.NDArray[np.float32]

__all__ = ["Harness", "app", "metric_sum", "parse_metrics", "run_bench"]

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)
# ``labelloop bench`` is a group: run bare, its callback is the serving bench; ``bench learning`` is
# the active-learning simulation (:mod:`labelloop.bench_learning`). labelloop/cli.py gathers each
# module's ``app.registered_commands`` into one app, so the group enters it as a command entry whose
# ``cls`` builds the group (see the end of this module).
group = typer.Typer(name="bench", no_args_is_help=False)

TRITON_CONCURRENCY = (1, 2, 4, 8)
BRIDGE_TASKS = (1, 8, 64)
# The fast_jpeg_decode A/B: camera-sized JPEGs (the bench images are at most 640 a side, which a
# reduced decode barely touches at imgsz 320), cycled over this many images, each decode timed best of 3.
JPEG_AB_SIZES = ((800, 600), (1280, 960), (1600, 1200), (1920, 1080))
JPEG_AB_IMAGES = 8
# A pause before each block, so spinning thread pools of the previous method go idle first:
# (a)'s default onnxruntime pool keeps one core spinning for about 45 ms after each run (measured).
SETTLE_S = 0.1
BRIDGE_START_S = 120.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus text exposition -> (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


_TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
)


class Harness:
    """The four methods and the blocks that time them; one instance per bench run."""

    def __init__(
        self,
        settings: Settings,
        plan: BenchPlan,
        images: list[BenchImage],
        urls: list[str],
        info: ModelInfo,
        bridge_url: str,
        triton_metrics_url: str,
        onnx_path: Path,
        weights_path: Path,
    ) -> None:
        from serving.triton.detector_ops import letterbox_stride, parse_onnx_metadata, postprocess

        self.settings = settings
        self.plan = plan
        self.images = images
        self.urls = urls
        self.info = info
        self.imgsz = int(info.imgsz[0])
        self.config = label_config(info.classes)
        self.bridge_url = bridge_url
        self.triton_metrics_url = triton_metrics_url
        self.tally = Tally()
        self.monitor: ProcessMonitor | None = None
        self.session, self.input_name = _raw_session(onnx_path)
        meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
        # The same letterbox as the Triton model: (a) runs exactly the network inputs (b) and (c) run.
        self.stride = letterbox_stride(self.session.get_inputs()[0].shape, meta, settings.rect)
        self.seed_model = _seed_model(weights_path)
        self.seed_threads = 0
        prepared = [self._prepare(image.data) for image in images]
        self.tensors = [tensor for tensor, _ in prepared]
        self.tally.boxes["raw"] = [
            len(postprocess(self._raw(tensor)[0], box, settings.conf, settings.iou)) for tensor, box in prepared
        ]
        self.raw_batches = _shape_batches(self.tensors, settings.max_batch_size)
        self._task_ids = iter(range(1, 10**9))
        # Triton at score threshold 0: round trip and NMS seconds, boxes per image.
        self.conf0: dict[str, list[float]] = defaultdict(list)
        self.jpeg_decode = self._jpeg_decode_ab()

    def _prepare(self, data: bytes) -> tuple[Tensor, Letterbox]:
        """Decode, letterbox and scale to NCHW float32, exactly as the Triton model does."""
        return self._prepare_as(data, self.settings.fast_jpeg_decode)

    def _prepare_as(self, data: bytes, fast_jpeg: bool) -> tuple[Tensor, Letterbox]:
        """``_prepare`` with ``fast_jpeg_decode`` on or off."""
        from core.image_decode import decode_image
        from serving.triton.detector_ops import letterbox, network_input

        size = (self.imgsz, self.imgsz)
        target = size if fast_jpeg else None
        img = decode_image(data, self.settings.max_image_bytes, self.settings.max_image_pixels, target=target)
        padded, box = letterbox(img.pixels, size, orig=(img.width, img.height), stride=self.stride)
        tensor: Tensor = network_input([padded])
        return tensor, box

    def _jpeg_decode_ab(self) -> dict[str, Any]:
        """``fast_jpeg_decode`` off vs on, same JPEGs: decode ms, boxes and their agreement (F1, IoU >= 0.5)."""
        import io

        import numpy as np

        from core.image_decode import decode_image
        from serving.quantize import matched_detections
        from serving.triton.detector_ops import postprocess
        from trainer.synthetic import render_sample

        rng = np.random.default_rng(self.plan.seed + 1)
        size = (self.imgsz, self.imgsz)
        limits = (self.settings.max_image_bytes, self.settings.max_image_pixels)
        decode_s: dict[str, list[float]] = {"full": [], "fast": []}
        boxes = {"full": 0, "fast": 0}
        matched = reduced = 0
        for k in range(JPEG_AB_IMAGES):
            width, height = JPEG_AB_SIZES[k % len(JPEG_AB_SIZES)]
            buf = io.BytesIO()
            render_sample(rng, width, height).image.save(buf, format="JPEG", quality=JPEG_QUALITY)
            data = buf.getvalue()
            dets = {}
            for mode, target in (("full", None), ("fast", size)):
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    img = decode_image(data, *limits, target=target)
                    best = min(best, time.perf_counter() - t0)
                decode_s[mode].append(best)
                if mode == "fast" and img.pixels.shape[1] < img.width:
                    reduced += 1
                tensor, box = self._prepare_as(data, mode == "fast")
                dets[mode] = postprocess(self._raw(tensor)[0], box, self.settings.conf, self.settings.iou)
                boxes[mode] += len(dets[mode])
            matched += matched_detections(dets["full"], dets["fast"])
        total = boxes["full"] + boxes["fast"]
        return {
            "images": JPEG_AB_IMAGES,
            "sizes": [f"{w}x{h}" for w, h in JPEG_AB_SIZES],
            "reduced": reduced,
            "decode_ms": {mode: round(statistics.fmean(v) * 1e3, 3) for mode, v in decode_s.items()},
            "boxes": boxes,
            "agreement_f1": round(1.0 if total == 0 else 2.0 * matched / total, 4),
            "enabled": self.settings.fast_jpeg_decode,
        }

    def _raw(self, x: Tensor) -> Tensor:
        out: Tensor = self.session.run(None, {self.input_name: x})[0]
        return out

    def _seed(self, data: bytes) -> int:
        import io

        from PIL import Image

        result = self.seed_model.predict(
            Image.open(io.BytesIO(data)),
            imgsz=self.imgsz,
            conf=self.settings.conf,
            iou=self.settings.iou,
            device="cpu",
            verbose=False,
        )[0]
        return len(result.boxes)

    def payload(self, indices: list[int]) -> dict[str, Any]:
        """A Label Studio /predict body: one task per image index."""
        tasks = [{"id": next(self._task_ids), "data": {"image": self.urls[k]}} for k in indices]
        return {"tasks": tasks, "label_config": self.config, "project": "1.1700000000"}

    # -- blocks -----------------------------------------------------------------------------

    def blocks(self, detector: DetectorClient, http: httpx.AsyncClient) -> dict[str, Callable[[], Awaitable[None]]]:
        """Every block of one round, by name; each times itself."""
        blocks: dict[str, Callable[[], Awaitable[None]]] = {
            "latency raw": self._latency_raw,
            "latency seed": self._latency_seed,
            "latency triton": lambda: self._latency_triton(detector),
            "latency bridge": lambda: self._latency_bridge(http),
            "stages": lambda: self._stages(detector),
            "triton conf 0": lambda: self._conf0(detector),
            f"raw batch {self.settings.max_batch_size}": self._raw_batches,
        }
        for c in TRITON_CONCURRENCY[1:]:
            blocks[f"triton concurrency {c}"] = lambda c=c: self._triton_concurrent(detector, c)  # type: ignore[misc]
        for n in BRIDGE_TASKS[1:]:
            blocks[f"bridge {n} tasks"] = lambda n=n: self._bridge_batches(http, n)  # type: ignore[misc]
        return blocks

    def _order(self, round_no: int) -> list[int]:
        order = list(range(len(self.images)))
        random.Random(self.plan.seed + round_no).shuffle(order)
        return order

    async def _latency_raw(self) -> None:
        started = time.perf_counter()
        for k in range(len(self.images)):
            t0 = time.perf_counter()
            self._raw(self.tensors[k])
            self.tally.latency["raw"].append(time.perf_counter() - t0)
        self._count(("raw", "batch 1"), len(self.images), started)

    async def _latency_seed(self) -> None:
        import torch

        started = time.perf_counter()
        for image in self.images:
            t0 = time.perf_counter()
            boxes = self._seed(image.data)
            self.tally.latency["seed"].append(time.perf_counter() - t0)
            self.tally.boxes["seed"].append(boxes)
        self._count(("seed", "1 image at a time"), len(self.images), started)
        self.seed_threads = torch.get_num_threads()  # what the timed calls ran on

    async def _latency_triton(self, detector: DetectorClient) -> None:
        async with self._window("triton concurrency 1", len(self.images)):
            started = time.perf_counter()
            for image in self.images:
                t0 = time.perf_counter()
                found = await detector.detect(image.data)
                self.tally.latency["triton"].append(time.perf_counter() - t0)
                self.tally.boxes["triton"].append(len(found.detections))
            self._count(("triton", "concurrency 1"), len(self.images), started)

    async def _latency_bridge(self, http: httpx.AsyncClient) -> None:
        before = parse_metrics((await http.get("/metrics")).text)
        async with self._window("bridge 1 task/request", len(self.images)):
            started = time.perf_counter()
            for k in range(len(self.images)):
                t0 = time.perf_counter()
                results = await self._predict(http, [k])
                self.tally.latency["bridge"].append(time.perf_counter() - t0)
                self.tally.boxes["bridge"].append(len(results[0]["result"]))
            self._count(("bridge", "1 task/request"), len(self.images), started)
        after = parse_metrics((await http.get("/metrics")).text)
        for stage in ("fetch", "format"):
            for i, suffix in enumerate(("_sum", "_count")):
                name = "labelloop_bridge_stage_seconds" + suffix
                delta = metric_sum(after, name, stage=stage) - metric_sum(before, name, stage=stage)
                self.tally.bridge_stages[stage][i] += delta

    async def _stages(self, detector: DetectorClient) -> None:
        """Decode, preprocess, infer and NMS by the Triton model's own clock, one lone request per image."""
        from serving.client import STAGES

        for image in self.images:
            found = await detector.detect(image.data, stages=True)
            for name in (*STAGES, "round_trip"):
                self.tally.stages[name].append(found.stats[f"{name}_s"])

    async def _conf0(self, detector: DetectorClient) -> None:
        """Lone requests at score threshold 0: every anchor is a candidate, NMS's worst case."""
        for image in self.images:
            found = await detector.detect(image.data, conf=0.0, stages=True)
            self.conf0["round_trip"].append(found.stats["round_trip_s"])
            self.conf0["nms"].append(found.stats["nms_s"])
            self.conf0["boxes"].append(len(found.detections))

    async def _raw_batches(self) -> None:
        """Every bench image once at full batches: each shape's per-image time, weighted by its images."""
        size = self.settings.max_batch_size
        runs = max(1, self.plan.block_images // (size * len(self.raw_batches)))
        seconds = 0.0
        for batch, images in self.raw_batches:
            started = time.perf_counter()
            for _ in range(runs):
                self._raw(batch)
            seconds += (time.perf_counter() - started) / (runs * size) * images
        work = self.tally.work[("raw", f"batch {size}")]
        work[0] += len(self.tensors)
        work[1] += seconds

    async def _triton_concurrent(self, detector: DetectorClient, concurrency: int) -> None:
        slots = asyncio.Semaphore(concurrency)
        n = self.plan.block_images

        async def one(k: int) -> None:
            async with slots:
                await detector.detect(self.images[k % len(self.images)].data)

        async with self._window(f"triton concurrency {concurrency}", n):
            started = time.perf_counter()
            await asyncio.gather(*(one(k) for k in range(n)))
            self._count(("triton", f"concurrency {concurrency}"), n, started)

    async def _bridge_batches(self, http: httpx.AsyncClient, tasks: int) -> None:
        requests = max(1, self.plan.block_images // tasks)
        async with self._window(f"bridge {tasks} tasks/request", requests * tasks):
            started = time.perf_counter()
            body: list[dict[str, Any]] = []
            for r in range(requests):
                body = await self._predict(http, [(r * tasks + k) % len(self.images) for k in range(tasks)])
            self._count(("bridge", f"{tasks} tasks/request"), requests * tasks, started)
        self._time_json(body)

    # -- helpers ----------------------------------------------------------------------------

    def _count(self, key: tuple[str, str], images: int, started: float) -> None:
        work = self.tally.work[key]
        work[0] += images
        work[1] += time.perf_counter() - started

    async def _predict(self, http: httpx.AsyncClient, indices: list[int]) -> list[dict[str, Any]]:
        import httpx

        try:
            response = await http.post("/predict", json=self.payload(indices))
        except httpx.HTTPError as exc:
            raise InferenceError(f"the bridge stopped answering ({type(exc).__name__}); see its log") from exc
        if response.status_code != 200:
            raise InferenceError(f"bridge /predict answered {response.status_code}: {response.text[:200]}")
        results: list[dict[str, Any]] = response.json()["results"]
        if len(results) != len(indices):
            raise InferenceError(f"bridge answered {len(results)} predictions for {len(indices)} tasks")
        return results

    def _time_json(self, results: list[dict[str, Any]]) -> None:
        """The bridge's response serialisation (pydantic dump + json.dumps, as FastAPI does), per task."""
        from ls_bridge.schemas import PredictResponse

        response = PredictResponse.model_validate({"results": results})
        t0 = time.perf_counter()
        json.dumps(response.model_dump(mode="json"))
        self.tally.json_s_per_task.append((time.perf_counter() - t0) / max(1, len(results)))

    def _window(self, load: str, images: int) -> _Window:
        return _Window(self, load, images)

    async def warm_up(self, detector: DetectorClient, http: httpx.AsyncClient) -> None:
        """First runs allocate and optimise; none of them is counted."""
        for image in self.images[:2]:
            self._seed(image.data)
            await detector.detect(image.data)
        for batch, _ in self.raw_batches:
            self._raw(batch)
        await asyncio.gather(*(detector.detect(i.data) for i in self.images[:8]))
        await self._predict(http, list(range(min(8, len(self.images)))))
        await self._predict(http, [0])


class _Window:
    """Adds what Triton counted and the CPU time each process spent during a block to the tally."""

    def __init__(self, harness: Harness, load: str, images: int) -> None:
        self.harness = harness
        self.load = load
        self.images = images
        self.labels = {"model": harness.info.name, "version": str(harness.info.version)}
        self._metrics: list[Sample] = []
        self._cpu: dict[str, float] = {}

    async def _scrape(self) -> list[Sample]:
        import httpx

        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            try:
                return parse_metrics((await client.get(self.harness.triton_metrics_url)).text)
            except httpx.HTTPError as exc:
                logger.debug("Triton metrics unavailable: %s", exc)
                return []

    def _cpu_now(self) -> dict[str, float]:
        monitor = self.harness.monitor
        return monitor.cpu_seconds() if monitor is not None else {}

    async def __aenter__(self) -> _Window:
        self._metrics = await self._scrape()
        self._cpu = self._cpu_now()
        return self

    async def __aexit__(self, *exc: object) -> None:
        cpu = self._cpu_now()
        after = await self._scrape()
        tally = self.harness.tally
        for name in _TRITON_COUNTERS:
            delta = metric_sum(after, name, **self.labels) - metric_sum(self._metrics, name, **self.labels)
            tally.triton[self.load][name] += delta
        for role, seconds in cpu.items():
            tally.cpu[self.load][role] += seconds - self._cpu.get(role, 0.0)
        tally.cpu_images[self.load] += self.images


def _shape_batches(tensors: list[Tensor], size: int) -> list[tuple[Tensor, int]]:
    """(a)'s batches: one full batch per network shape, cycled from the images of that shape (no
    padding, so the floor stays a floor), with how many bench images have the shape."""
    import numpy as np

    by_shape: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_shape[tensor.shape].append(tensor)
    return [(np.concatenate([group[k % len(group)] for k in range(size)]), len(group)) for group in by_shape.values()]


def _raw_session(onnx_path: Path) -> tuple[Any, str]:
    """Method (a): onnxruntime as anyone would call it: default session options, CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def _seed_model(weights: Path) -> Any:
    """Method (d): the seed's ultralytics model, loaded once (the seed reloaded it per request).

    Threads stay ultralytics' own, as (a) keeps onnxruntime's defaults: its predictor sets torch to one
    thread fewer than the cores (one on two cores), which is what the seed's backend ran with.
    """
    try:
        from ultralytics import YOLO
    except ImportError as exc:
        raise ConfigError("the seed comparison needs ultralytics: pip install 'labelloop[train]'") from exc
    return YOLO(str(weights), task="detect")


async def _measure(harness: Harness, detector: DetectorClient, bridge_url: str, bar: tqdm) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=bridge_url, timeout=300.0, trust_env=False) as http:
        bar.set_postfix_str("warm-up")
        await harness.warm_up(detector, http)
        bar.update()
        blocks = harness.blocks(detector, http)
        bar.total = bar.n + harness.plan.rounds * len(blocks)
        bar.refresh()
        for round_no in range(harness.plan.rounds):
            names = list(blocks)
            random.Random(harness.plan.seed * 1000 + round_no).shuffle(names)
            for name in names:
                bar.set_postfix_str(f"round {round_no + 1}: {name}")
                await asyncio.sleep(SETTLE_S)
                await blocks[name]()
                bar.update()
        failed = metric_sum(
            parse_metrics((await http.get("/metrics")).text), "labelloop_bridge_tasks_total", outcome="failed"
        )
        if failed:
            raise InferenceError(f"the bridge failed {failed:.0f} bench tasks; see its log")


async def _load(url: str, repo: ModelRepository, model_name: str, timeout_s: float) -> ModelInfo:
    from serving.client import DetectorClient
    from serving.control import load_served_version

    async with DetectorClient(url, model_name, timeout_s=timeout_s) as client:
        return await load_served_version(client, repo)


def run_bench(settings: Settings, plan: BenchPlan) -> dict[str, Any]:
    """Start Triton, the bridge and an image server, measure, stop them all; the report as a dict."""
    from tqdm import tqdm

    from labelloop.bench_backbone import BackboneBench, publish_demo_backbone
    from labelloop.bench_report import build_report
    from labelloop.bench_rig import (
        BridgeProcess,
        ImageServer,
        free_port,
        machine_info,
        private_repository,
        render_images,
        start_private_triton,
    )
    from serving.client import DetectorClient

    started = time.perf_counter()
    load_before = os.getloadavg()
    # images, backbone demo, tritonserver, bridge, raw + seed, sampler, warm-up; the rounds follow
    setup_steps = 7
    with (
        tempfile.TemporaryDirectory(prefix="labelloop-bench-") as tmp,
        ExitStack() as stack,
        tqdm(total=setup_steps, desc="bench", unit="step", file=sys.stderr) as bar,
    ):
        root = Path(tmp)
        bar.set_postfix_str("images")
        repo, version = private_repository(settings, root / "model_repository")
        precision = repo.card(settings.model_name, version).precision
        images = render_images(plan.images, plan.seed)
        server = stack.enter_context(ImageServer(images))
        bar.update()

        bar.set_postfix_str("backbone demo")
        publish_s = publish_demo_backbone(settings, repo, root / "backbone")
        bar.update()

        bar.set_postfix_str("tritonserver")
        triton = start_private_triton(settings, repo.root, root / "triton", "bench-triton.log")
        stack.callback(triton.stop)
        info = asyncio.run(_load(triton.grpc_url, repo, settings.model_name, settings.triton_timeout_s))
        bar.update()

        bar.set_postfix_str("bridge")
        bridge = stack.enter_context(
            BridgeProcess(
                free_port(),
                triton.grpc_url,
                settings.model_name,
                root / "bridge",
                settings.log_dir / "bench-bridge.log",
                f"http://{server.host}",
            )
        )
        bridge.start()
        bridge.wait_ready(BRIDGE_START_S)
        bar.update()

        bar.set_postfix_str("raw session, seed model")
        name = settings.model_name
        weights = repo.weights_path(name, version)
        assert weights is not None  # private_repository checked it
        harness = Harness(
            settings,
            plan,
            images,
            [server.url(image.name) for image in images],
            info,
            bridge.url,
            f"http://127.0.0.1:{triton.ports['metrics']}/metrics",
            repo.onnx_path(name, version),
            weights,
        )
        bar.update()
        assert bridge.pid is not None and triton.pid is not None

        async def measure() -> None:
            concurrency = max(TRITON_CONCURRENCY[-1], settings.triton_concurrency)
            async with DetectorClient(
                triton.grpc_url, name, timeout_s=settings.triton_timeout_s, concurrency=concurrency, retries=0
            ) as detector:
                await _measure(harness, detector, bridge.url, bar)

        # The peaks close with the detector's rounds: the backbone loads into Triton after them.
        with ProcessMonitor({"bridge": bridge.pid, "tritonserver": triton.pid}) as monitor:
            harness.monitor = monitor
            bar.update()
            asyncio.run(measure())

        bar.total += 1
        bar.set_postfix_str("backbone: Triton vs raw onnxruntime")
        backbone = BackboneBench(settings, plan, images, repo)
        backbone.tally.publish_s = publish_s
        asyncio.run(backbone.measure(triton.grpc_url, repo))
        bar.update()

        bar.total += 1
        bar.set_postfix_str("segmenter: interactive clicks")
        segmenter = _segmenter(settings, plan, repo, root / "segmenter", triton.grpc_url)
        bar.update()
    report = build_report(
        harness=harness,
        monitor=monitor,
        machine=machine_info() | {"load_average_before": load_before, "load_average_after": os.getloadavg()},
        version=version,
        precision=precision,
        duration_s=time.perf_counter() - started,
        backbone=backbone.tally,
    )
    report["segmenter"] = segmenter
    return report


def _segmenter(settings: Settings, plan: BenchPlan, repo: ModelRepository, work: Path, url: str) -> dict[str, Any]:
    """The interactive click section (:mod:`labelloop.bench_segmenter`), on the backbone the section before loaded."""
    from labelloop.bench_segmenter import (
        FULL_IMAGES,
        QUICK_IMAGES,
        SegmenterBench,
        segmenter_section,
        train_bench_segmenter,
    )

    _, held_out, model = train_bench_segmenter(settings, repo, work)
    bench = SegmenterBench(held_out, QUICK_IMAGES if plan.images <= QUICK.images else FULL_IMAGES, model)
    asyncio.run(bench.measure(url, repo, settings.triton_timeout_s))
    return segmenter_section(bench.tally)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@group.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer images and rounds (under 3 minutes on 2 cores).")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON here.")] = None,
    png_out: Annotated[Path | None, typer.Option("--png", help="Write the chart (PNG) here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write the markdown tables here.")] = None,
    model_repository: Annotated[
        Path | None, typer.Option("--model-repository", help="Model repository whose newest version is measured.")
    ] = None,
    images: Annotated[int | None, typer.Option(hidden=True, min=1, help="Bench images (tests).")] = None,
    rounds: Annotated[int | None, typer.Option(hidden=True, min=1, help="Rounds (tests).")] = None,
) -> None:
    """Time raw onnxruntime, Triton, the bridge and the seed's ultralytics on the same images; print ratios.

    Then the demo DINOv3 backbone: Triton against raw onnxruntime on the same ONNX at long sides 224 and 448.
    `labelloop bench learning --kind KIND` instead simulates active learning (labels saved against random).
    """
    if ctx.invoked_subcommand is not None:
        return
    from labelloop.bench_report import render_markdown, write_png

    plan = QUICK if quick else FULL
    plan = BenchPlan(
        images=images or plan.images, rounds=rounds or plan.rounds, block_images=plan.block_images, seed=plan.seed
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        settings = load_settings(model_repository=model_repository)
        report = run_bench(settings, plan)
    except LabelloopError as exc:
        raise fail(exc) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    markdown = render_markdown(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if markdown_out is not None:
        markdown_out.write_text(markdown)
    if png_out is not None:
        write_png(report, png_out)
    typer.echo(markdown)


group.command("learning")(learning)


def _bench_group(**_: Any) -> Any:
    """The ``bench`` group, built where typer builds a command from the entry below."""
    return typer.main.get_group(group)


app.registered_commands.append(CommandInfo(name="bench", cls=_bench_group, callback=bench))  # type: ignore[arg-type]
