"""The detector served by a real tritonserver: parity with ultralytics, bad inputs, versions, outages."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from core.errors import ImageError, TritonUnavailableError
from core.settings import Settings
from labelloop.cli import app
from serving.client import STAGES, DetectorClient, ImageDetections, make_client
from serving.publish import detector_config, publish_weights
from serving.repository import ModelCard, ModelRepository
from tests.conftest import TEST_IMGSZ, TritonHandle

pytestmark = [pytest.mark.slow, pytest.mark.triton]

CONF, IOU = 0.25, 0.7


def _unseen_images(out: Path, n: int = 12) -> list[Path]:
    """Images the test model never saw (another seed), in every format the issue names."""
    from trainer.synthetic import render_sample

    rng = np.random.default_rng(12345)
    paths = []
    for i in range(n):
        image = render_sample(rng).image
        kind = i % 4
        if kind == 0:
            path = out / f"{i}.jpg"
            image.save(path, quality=92)
        elif kind == 1:  # stored rotated, displayed upright through EXIF orientation 6
            path = out / f"{i}_exif.jpg"
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif)
        elif kind == 2:
            path = out / f"{i}_gray.png"
            image.convert("L").save(path)
        else:
            path = out / f"{i}_rgba.png"
            rgba = image.convert("RGBA")
            rgba.putalpha(255)
            rgba.save(path)
        paths.append(path)
    return paths


# At least twice the model's size (imgsz 320): where a reduced-DCT decode would kick in.
LARGE_JPEGS = ((800, 600), (1600, 1200), (2000, 1500))


def _large_jpegs(out: Path) -> list[Path]:
    """Camera-sized JPEGs, one stored rotated with EXIF orientation 6, the model never saw."""
    from trainer.synthetic import render_sample

    rng = np.random.default_rng(2024)
    paths = []
    for width, height in LARGE_JPEGS:
        path = out / f"large_{width}x{height}.jpg"
        render_sample(rng, width, height).image.save(path, quality=90)
        paths.append(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = out / "large_exif.jpg"
    render_sample(rng, 1600, 1200).image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    return [*paths, path]


def _display_bgr(path: Path) -> np.ndarray:
    """What a person sees, as the BGR array ultralytics expects."""
    with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1])


def _iou(a: dict[str, float], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a["x2"], b[2]) - max(a["x1"], b[0]))
    iy = max(0.0, min(a["y2"], b[3]) - max(a["y1"], b[1]))
    inter = ix * iy
    union = (a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_detect_matches_ultralytics_on_unseen_images(triton_server: TritonHandle, tmp_path: Path) -> None:
    from ultralytics import YOLO

    large = _large_jpegs(tmp_path)
    images = _unseen_images(tmp_path) + large
    result = CliRunner().invoke(
        app, ["detect", *map(str, images), "--triton-url", triton_server.url, "--json", "--conf", str(CONF)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    onnx = ModelRepository(triton_server.settings.model_repository).onnx_path("defect_detector", 1)
    reference = YOLO(str(onnx), task="detect")
    compared = compared_large = 0
    for path, row in zip(images, rows, strict=True):
        assert row["image"] == str(path) and row["model_version"] == 1
        display = _display_bgr(path)
        assert (row["width"], row["height"]) == (display.shape[1], display.shape[0])
        ref = reference.predict(display, imgsz=TEST_IMGSZ, conf=CONF, iou=IOU, verbose=False)[0]
        boxes = ref.boxes
        theirs = [
            (*map(float, xyxy), float(score), ref.names[int(cls)])
            for xyxy, score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
        ]
        ours = row["detections"]
        # Same decode, same rectangle letterbox (ultralytics' own for a dynamic-shape ONNX), same
        # network: the same boxes, one to one.
        assert len(ours) == len(theirs), f"{path.name}: ultralytics {theirs}, Triton {ours}"
        for x1, y1, x2, y2, score, label in theirs:
            match = [d for d in ours if d["label"] == label and _iou(d, (x1, y1, x2, y2)) >= 0.999]
            assert match, f"{path.name}: ultralytics {label} {score:.3f} at {(x1, y1, x2, y2)} missing in {ours}"
            assert abs(match[0]["score"] - score) <= 1e-3
            compared += 1
            compared_large += path in large
    assert compared >= 5, "too few detections to prove parity: the test model is too weak"
    # Large JPEGs are decoded in full by default: the pixels ultralytics (and the trainer) see.
    assert compared_large >= 3, "too few detections on the large JPEGs to prove their parity"


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_fail_alone(triton_server: TritonHandle, demo_dataset: Path) -> None:
    good = next((demo_dataset.parent / "images" / "val").glob("*.jpg")).read_bytes()
    bomb = _png((12_000, 12_000), "L")  # 144 MP of zeros: a few hundred KB on the wire
    assert len(bomb) < 1_000_000
    batch = [good, b"", b"\xff\xd8\xff\xe0 definitely not a jpeg", bomb, good[: len(good) // 3], good]

    async def run() -> list[ImageDetections | Exception]:
        async with make_client(triton_server.settings) as client:
            return list(await client.detect_many(batch))

    results = asyncio.run(run())
    assert isinstance(results[0], ImageDetections) and isinstance(results[-1], ImageDetections)
    assert results[0].detections == results[-1].detections
    assert isinstance(results[1], ImageError) and "empty" in str(results[1])
    assert isinstance(results[2], ImageError) and "decode" in str(results[2])
    assert isinstance(results[3], ImageError) and "pixels" in str(results[3])
    assert isinstance(results[4], ImageError)


def _exec_count(metrics_port: int) -> float:
    """How many times Triton ran the detector's execute() so far (its own metrics)."""
    import httpx

    from labelloop.bench import metric_sum, parse_metrics

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False).text
    return metric_sum(parse_metrics(text), "nv_inference_exec_count", model="defect_detector")


def test_a_bad_request_fails_alone_in_its_dynamic_batch(model_repo: Path, tmp_path: Path, demo_dataset: Path) -> None:
    """Requests queued together (a 1 s batch delay) run in one execute(); bad parameters fail only their own."""
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    from tests.conftest import make_settings, start_triton

    repo = tmp_path / "model_repository"
    shutil.copytree(model_repo, repo)
    slow_batches = replace(
        detector_config(make_settings(repo, tmp_path / "state")), batch_delay_us=1_000_000, instance_count=1
    )
    ModelRepository(repo).write_config(slow_batches)
    image = next((demo_dataset.parent / "images" / "val").glob("*.jpg")).read_bytes()
    bad: list[dict[str, object]] = [
        {"score_threshold": 5.0},
        {"score_threshold": "high"},
        {"iou_threshold": True},
        {"iou_threshold": 0.0},
    ]
    requests: list[dict[str, object] | None] = [None, bad[0], None, bad[1], bad[2], None, bad[3]]

    async def infer(client: grpcaio.InferenceServerClient, params: dict[str, object] | None) -> object:
        tensor = grpcaio.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        try:
            result = await client.infer("defect_detector", [tensor], parameters=params)
        except InferenceServerException as exc:
            return exc
        return int(result.as_numpy("NUM_DETECTIONS")[0, 0])

    async def run(url: str) -> list[object]:
        client = grpcaio.InferenceServerClient(url)
        try:
            return list(await asyncio.gather(*(infer(client, params) for params in requests)))
        finally:
            await client.close()

    handle = start_triton(repo, tmp_path / "state")
    try:
        before = _exec_count(handle.process.ports["metrics"])
        answers = asyncio.run(run(handle.url))
        ran = _exec_count(handle.process.ports["metrics"]) - before
    finally:
        handle.process.stop()
    assert ran == 1, f"the {len(requests)} requests ran in {ran} executions, not one shared batch"
    good = [a for a, params in zip(answers, requests, strict=True) if params is None]
    assert all(isinstance(a, int) for a in good) and len(set(good)) == 1, answers
    errors = [str(a) for a, params in zip(answers, requests, strict=True) if params is not None]
    assert all(isinstance(a, InferenceServerException) for a, p in zip(answers, requests, strict=True) if p), answers
    assert "score_threshold 5.0 out of range" in errors[0]
    assert "score_threshold must be a number" in errors[1]
    assert "iou_threshold must be a number" in errors[2]
    assert "iou_threshold 0.0 out of range" in errors[3]


def test_the_model_times_its_own_stages_when_asked(triton_server: TritonHandle, demo_dataset: Path) -> None:
    image = next((demo_dataset.parent / "images" / "val").glob("*.jpg")).read_bytes()

    async def run() -> tuple[ImageDetections, ImageDetections]:
        async with make_client(triton_server.settings) as client:
            return await client.detect(image, stages=True), await client.detect(image)

    timed, plain = asyncio.run(run())
    assert timed.detections == plain.detections
    assert set(plain.stats) == {"round_trip_s"}, "stage times are sent only to a client that asks"
    stages = {name: timed.stats[f"{name}_s"] for name in STAGES}
    assert all(seconds > 0 for seconds in stages.values()), stages
    assert stages["infer"] == max(stages.values()), stages
    assert sum(stages.values()) < timed.stats["round_trip_s"]


def test_a_batch_of_mixed_shapes_answers_each_image_as_if_alone(triton_server: TritonHandle, tmp_path: Path) -> None:
    """Concurrent requests form dynamic batches of different rectangles; each runs at its own shape."""
    from trainer.synthetic import render_sample

    rng = np.random.default_rng(99)
    images = []
    for width, height in [(640, 360), (300, 400), (500, 500), (400, 300), (250, 600), (512, 288)] * 2:
        buf = io.BytesIO()
        render_sample(rng, width, height).image.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())

    async def run() -> tuple[list[ImageDetections], list[ImageDetections | Exception]]:
        async with make_client(triton_server.settings) as client:
            alone = [await client.detect(image) for image in images]
            together = await client.detect_many(images)
            return alone, together

    alone, together = asyncio.run(run())
    assert sum(len(a.detections) for a in alone) >= 6
    for a, b in zip(alone, together, strict=True):
        assert isinstance(b, ImageDetections)
        assert [d.label for d in a.detections] == [d.label for d in b.detections]
        for da, db in zip(a.detections, b.detections, strict=True):
            assert abs(da.score - db.score) < 1e-4 and abs(da.x1 - db.x1) < 1e-2 and abs(da.y2 - db.y2) < 1e-2


def test_cli_detect_reports_bad_files_and_goes_on(triton_server: TritonHandle, tmp_path: Path) -> None:
    good = _unseen_images(tmp_path, 1)[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(
        app, ["detect", str(bad), str(tmp_path / "missing.jpg"), str(good), "--json", "--triton-url", triton_server.url]
    )
    assert result.exit_code == 2
    rows = json.loads(result.stdout)
    assert "decode" in rows[0]["error"] and "read" in rows[1]["error"]
    assert "error" not in rows[2] and rows[2]["model_version"] == 1


def test_models_json_lists_served_version(triton_server: TritonHandle) -> None:
    result = CliRunner().invoke(
        app,
        [
            "models",
            "--json",
            "--triton-url",
            triton_server.url,
            "--model-repository",
            str(triton_server.settings.model_repository),
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["name"] == "defect_detector" and row["version"] == 1 and row["served"] is True
    assert row["classes"] == ["dentado", "concave", "perforation"] and row["imgsz"] == TEST_IMGSZ
    assert Path(row["onnx"]).is_file() and isinstance(row["metrics"], dict)


def test_model_info_comes_from_the_server(triton_server: TritonHandle) -> None:
    info = triton_server.info
    assert info.version == 1 and info.classes == ["dentado", "concave", "perforation"]
    assert info.imgsz == [TEST_IMGSZ, TEST_IMGSZ] and info.provider == "CPUExecutionProvider"


def test_publishing_next_version_under_load_loses_no_request(
    private_triton: TritonHandle, trained_weights: Path, demo_dataset: Path
) -> None:
    image = next((demo_dataset.parent / "images" / "val").glob("*.jpg")).read_bytes()
    settings = private_triton.settings
    seen: list[tuple[float, float, int]] = []  # (sent, answered, version), in the order answered
    errors: list[Exception] = []

    async def traffic(client: DetectorClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                version = (await client.detect(image)).model_version
            except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                errors.append(exc)
            else:
                seen.append((sent, time.monotonic(), version))

    async def run() -> None:
        stop = asyncio.Event()
        async with make_client(settings) as client:
            workers = [asyncio.create_task(traffic(client, stop)) for _ in range(4)]
            await asyncio.sleep(1.0)
            card = ModelCard(name=settings.model_name, version=0, classes=[], imgsz=TEST_IMGSZ)
            version, served = await asyncio.to_thread(publish_weights, settings, trained_weights, card, True)
            assert version == 2 and served is not None and served.version == 2
            deadline = time.monotonic() + 10
            while (not seen or seen[-1][2] != 2) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*workers)

    asyncio.run(run())
    assert errors == []
    assert seen[0][2] == 1 and len(seen) > 20
    # Once version 2 has answered, every request sent afterwards is answered by it. (A request sent
    # just before the switch may still be answered by version 1 after a version-2 answer.)
    switched = min(answered for _, answered, version in seen if version == 2)
    after = [version for sent, _, version in seen if sent > switched]
    assert after and set(after) == {2}


def test_broken_newest_version_falls_back_on_restart(private_triton: TritonHandle, tmp_path: Path) -> None:
    from tests.conftest import start_triton

    repo = ModelRepository(private_triton.settings.model_repository)
    broken = repo.version_dir("defect_detector", 2)
    broken.mkdir()
    for name in ("model.py", "detector_ops.py", "image_decode.py", "card.json"):
        (broken / name).write_bytes((repo.version_dir("defect_detector", 1) / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"half-written")
    private_triton.process.stop()
    handle = start_triton(repo.root, tmp_path / "state2")
    try:
        assert handle.info.version == 1
    finally:
        handle.process.stop()


def test_stopped_server_gives_clear_error_within_timeout(private_triton: TritonHandle) -> None:
    private_triton.process.stop()

    async def run() -> None:
        client = DetectorClient(private_triton.url, "defect_detector", timeout_s=2.0, retries=2, backoff_s=0.1)
        try:
            await client.detect(b"anything")
        finally:
            await client.close()

    started = time.monotonic()
    with pytest.raises(TritonUnavailableError, match="unreachable|deadline"):
        asyncio.run(run())
    assert time.monotonic() - started < 3 * 2.0 + 1.0


def test_ensemble_variant_answers_like_the_single_model(
    triton_server: TritonHandle, tmp_path: Path, demo_dataset: Path
) -> None:
    """The onnxruntime variant's wiring, run here with the python stand-in for the ONNX step."""
    from tests.conftest import start_triton

    out = tmp_path / "ensemble_repo"
    result = CliRunner().invoke(
        app,
        [
            "export-ensemble",
            str(out),
            "--cpu",
            "--core",
            "python",
            "--model-repository",
            str(triton_server.settings.model_repository),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "defect_detector",
        "defect_detector_onnx",
        "defect_detector_postprocess",
        "defect_detector_preprocess",
    ]
    # The ensemble's tensors are imgsz x imgsz (fixed dims for TensorRT): it answers like the single
    # model letterboxing to the square, served beside it under another name.
    square = replace(detector_config(triton_server.settings), name="square_detector", rect=False)
    ModelRepository(out).write_config(square)
    shutil.copytree(
        ModelRepository(triton_server.settings.model_repository).version_dir("defect_detector", 1),
        out / square.name / "1",
    )
    images = [p.read_bytes() for p in sorted((demo_dataset.parent / "images" / "val").iterdir())[:6]]
    images.append(b"broken")

    async def detect(settings: Settings, name: str = "defect_detector") -> list[ImageDetections | Exception]:
        async with DetectorClient(settings.triton_url, name) as client:
            if name != settings.model_name:
                await client.load()
            return list(await client.detect_many(images))

    handle = start_triton(out, tmp_path / "state")
    try:
        assert handle.info.classes == triton_server.info.classes
        ensemble = asyncio.run(detect(handle.settings))
        single = asyncio.run(detect(handle.settings, square.name))
    finally:
        handle.process.stop()
    assert isinstance(ensemble[-1], ImageError)
    for a, b in zip(single[:-1], ensemble[:-1], strict=True):
        assert isinstance(a, ImageDetections) and isinstance(b, ImageDetections)
        assert (a.width, a.height) == (b.width, b.height)
        assert [d.label for d in a.detections] == [d.label for d in b.detections]
        for da, db in zip(a.detections, b.detections, strict=True):
            assert abs(da.score - db.score) < 1e-4 and abs(da.x1 - db.x1) < 1e-2
