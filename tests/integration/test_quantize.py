"""INT8 models: made from the user's images, gated against FP32, served by a real tritonserver."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import pytest
from typer.testing import CliRunner

import serving.quantize as quantize
from core.errors import ConfigError, QuantizationError
from labelloop.cli import app
from serving.client import Detection, make_client
from serving.publish import build_model
from serving.repository import ModelRepository
from tests.conftest import INT8_MIN_AGREEMENT, TEST_IMGSZ, TritonHandle, make_settings, start_triton

pytestmark = [pytest.mark.slow, pytest.mark.triton]

OPTIONS = quantize.QuantizeOptions(
    min_agreement=INT8_MIN_AGREEMENT,
    conf=0.25,
    iou=0.7,
    max_image_bytes=50_000_000,
    max_image_pixels=60_000_000,
    rect=True,
)


def _split(demo_dataset: Path) -> tuple[list[Path], list[Path]]:
    """Calibration from the training images, checks on the validation images (never calibrated on)."""
    root = demo_dataset.parent / "images"
    return sorted((root / "train").iterdir())[:32], sorted((root / "val").iterdir())[:16]


def _served_fp32(model_repo: Path) -> Path:
    repo = ModelRepository(model_repo)
    return repo.onnx_path("defect_detector", repo.latest("defect_detector") or 0)


def _head_quantized_too(nodes: Sequence[Any], producer: str) -> list[str]:
    """Keeps one unrelated node FP32 instead of the head's tail: the mistake the gate is for."""
    return [nodes[0].name]


def test_the_gate_passes_int8_and_refuses_a_quantized_head(
    model_repo: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _served_fp32(model_repo)
    calibration, check = _split(demo_dataset)
    same = quantize.agreement(src, src, check, OPTIONS)
    assert same.f1 == 1.0 and same.images == len(check) and same.reference_detections > len(check)

    result = quantize.quantize_int8(src, tmp_path / "int8.onnx", calibration, check, OPTIONS)
    model = onnx.load(str(result.onnx))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and result.fp32_nodes > 0
    # the head's tail stays FP32: the output comes from a float op, not a DequantizeLinear
    producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert producer.op_type == "Concat"
    assert {p.key: p.value for p in model.metadata_props} == {
        p.key: p.value for p in onnx.load(str(src)).metadata_props
    }
    assert INT8_MIN_AGREEMENT <= result.agreement < 1.0  # close to FP32, and really a different model
    assert result.check_images == len(check) and result.fp32_detections == same.reference_detections

    # Quantizing the head's tail too (one scale for pixels and scores) leaves no detection standing.
    monkeypatch.setattr(quantize, "_head_tail", _head_quantized_too)
    with pytest.raises(QuantizationError, match=r"agrees with FP32 on 0\.0\d\d of detections"):
        quantize.quantize_int8(src, tmp_path / "bad.onnx", calibration, check, OPTIONS)
    assert not (tmp_path / "bad.onnx").exists()


def test_a_refused_int8_publishes_fp32_and_says_why(
    trained_weights: Path, demo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path / "repo", tmp_path / "state", precision="int8", int8_min_agreement=INT8_MIN_AGREEMENT
    )
    with pytest.raises(ConfigError, match="needs images from the model's domain"):
        build_model(settings, trained_weights, TEST_IMGSZ, tmp_path / "none", [tmp_path / "notes.txt"])

    images = sorted((demo_dataset.parent / "images" / "train").iterdir())[:24]
    few = build_model(settings, trained_weights, TEST_IMGSZ, tmp_path / "few", images[:3])
    assert few.precision == "fp32" and "give at least 4" in few.quantization["refused"]

    monkeypatch.setattr(quantize, "_head_tail", _head_quantized_too)
    built = build_model(settings, trained_weights, TEST_IMGSZ, tmp_path / "built", images)
    assert built.precision == "fp32" and "agrees with FP32" in built.quantization["refused"]
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(built.onnx)).graph.node)
    assert not (tmp_path / "built" / "model.int8.onnx").exists()


def _matched(a: list[Detection], b: list[Detection]) -> int:
    """Detections of ``a`` with a same-class box in ``b`` at IoU >= 0.5 (the test's own matcher)."""

    def iou(p: Detection, q: Detection) -> float:
        w = max(0.0, min(p.x2, q.x2) - max(p.x1, q.x1))
        h = max(0.0, min(p.y2, q.y2) - max(p.y1, q.y1))
        union = (p.x2 - p.x1) * (p.y2 - p.y1) + (q.x2 - q.x1) * (q.y2 - q.y1) - w * h
        return w * h / union if union > 0 else 0.0

    return sum(any(d.class_id == e.class_id and iou(d, e) >= 0.5 for e in b) for d in a)


def test_export_int8_is_served_by_triton_with_fp32_detections(
    trained_weights: Path, demo_dataset: Path, triton_server: TritonHandle, tmp_path: Path
) -> None:
    calibration, check = _split(demo_dataset)
    folder = tmp_path / "calibration"
    folder.mkdir()
    for image in calibration:
        (folder / image.name).write_bytes(image.read_bytes())
    repo = tmp_path / "repo"
    argv = ["export", str(trained_weights), "--imgsz", str(TEST_IMGSZ), "--model-repository", str(repo)]
    runner = CliRunner(env={"LABELLOOP_INT8_MIN_AGREEMENT": str(INT8_MIN_AGREEMENT)})
    missing = runner.invoke(app, [*argv, "--precision", "int8", "--no-load"])
    assert missing.exit_code == 1 and "--calibration" in missing.output
    needless = runner.invoke(app, [*argv, "--calibration", str(folder), "--no-load"])
    assert needless.exit_code == 1 and "--calibration is for --precision int8" in needless.output
    result = runner.invoke(app, [*argv, "--precision", "int8", "--calibration", str(folder), "--no-load"])
    assert result.exit_code == 0, result.output
    assert "version 1, int8 (agreement with fp32" in result.output
    card = ModelRepository(repo).card("defect_detector", 1)
    assert card.precision == "int8" and card.quantization["agreement"] >= INT8_MIN_AGREEMENT
    assert (card.quantization["calibration_images"], card.quantization["check_images"]) == (24, 8)  # 3 in 4
    assert card.quantization["fp32_detections"] >= quantize.MIN_DETECTIONS

    int8 = start_triton(repo, tmp_path / "state")
    try:

        async def both() -> tuple[list[list[Detection]], list[list[Detection]]]:
            async with make_client(triton_server.settings) as fp32, make_client(int8.settings) as q:
                a = [(await fp32.detect(p.read_bytes())).detections for p in check]
                b = [(await q.detect(p.read_bytes())).detections for p in check]
                return a, b

        reference, quantized = asyncio.run(both())
    finally:
        int8.process.stop()
    assert int8.info.version == 1
    total = sum(len(d) for d in reference) + sum(len(d) for d in quantized)
    matched = sum(_matched(a, b) + _matched(b, a) for a, b in zip(reference, quantized, strict=True))
    assert total > 2 * len(check)  # the images have defects, and both models find them
    assert matched / total >= 0.9
