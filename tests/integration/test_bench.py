"""``labelloop bench`` end to end on the test model: real tritonserver, bridge process, ultralytics.

Structure and sanity only; the ratios' target values are machine-dependent and never asserted here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labelloop.bench_report import METHODS, RATIO_DEFINITIONS, TARGETS
from labelloop.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.triton]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_quick_writes_json_png_and_markdown(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "state"))
    out = {"json": tmp_path / "bench.json", "png": tmp_path / "bench.png", "markdown": tmp_path / "bench.md"}
    args = ["bench", "--quick", "--images", "4", "--rounds", "1", "--model-repository", str(model_repo)]
    for flag, path in out.items():
        args += [f"--{flag}", str(path)]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    report = json.loads(out["json"].read_text())
    ratios = report["ratios"]
    for name in ("triton_vs_raw_p50", "bridge_vs_raw_throughput", "bridge_vs_seed_throughput"):
        assert ratios[name] > 0 and math.isfinite(ratios[name]), name
    assert set(report["ratio_definitions"]) == set(RATIO_DEFINITIONS) >= set(ratios)
    assert set(report["targets"]) == set(TARGETS)
    assert report["all_targets_met"] == all(t["met"] for t in report["targets"].values())

    assert set(report["latency_ms"]) == set(METHODS)
    for method, stats in report["latency_ms"].items():
        assert stats["n"] >= 4 and 0 < stats["p50"] <= stats["p95"] <= stats["p99"], method
    throughput = report["throughput_images_per_s"]
    assert set(throughput["bridge"]) == {"1 task/request", "8 tasks/request", "64 tasks/request"}
    assert set(throughput["triton"]) == {f"concurrency {c}" for c in (1, 2, 4, 8)}
    assert all(v > 0 for loads in throughput.values() for v in loads.values())
    assert report["peak_rss_mb"]["bridge"] > 0 and report["peak_rss_mb"]["triton"] > 0

    stages = {row["stage"]: row["ms"] for row in report["stages_ms"]}
    for stage in ("fetch", "decode", "preprocess", "infer", "nms", "format", "json"):
        assert stages[stage] >= 0, stage
    # Same ONNX and the same pre/post-processing functions: the same boxes, however they are reached.
    boxes = report["boxes_per_image"]
    assert boxes["raw"] == boxes["triton"] == boxes["bridge"]
    assert report["machine"]["cpu_model"] and report["machine"]["cores_logical"] >= 1
    # Read after the seed's timed calls (ultralytics sets torch's threads when it builds its predictor).
    assert report["setup"]["seed_torch_threads"] >= 1

    # The demo backbone, Triton against raw onnxruntime on the same ONNX at both long sides.
    backbone = report["backbone"]
    assert backbone["model"]["note"] == "random-init demo backbone" and backbone["model"]["arch"] == "dinov3_demo"
    assert set(backbone["long_sides"]) == {"224", "448"}
    for side, row in backbone["long_sides"].items():
        loads = {"raw", "pipeline", "triton concurrency 1", "triton concurrency 4"}
        assert set(row["throughput_images_per_s"]) == loads, side
        assert all(v > 0 for v in row["throughput_images_per_s"].values()), side
        assert set(row["latency_ms"]) == {"raw", "pipeline", "triton"} and row["latency_ms"]["raw"]["n"] >= 4, side
        # Same ONNX, same pixels: the served tokens differ from raw onnxruntime's by fp16 rounding only.
        assert 0 <= row["max_abs_diff_triton_vs_raw"] <= 1e-2, side
    per_side = [row["triton_vs_raw_throughput"] for row in backbone["long_sides"].values()]
    assert ratios["backbone_triton_vs_raw_throughput"] == pytest.approx(min(per_side), abs=1e-3)
    assert "backbone_triton_vs_raw_throughput" in report["targets"]

    assert out["png"].read_bytes()[:8] == PNG_MAGIC
    markdown = out["markdown"].read_text()
    assert "| ratio | value | target | met |" in markdown
    assert "| triton_vs_raw_p50 |" in markdown and "| backbone_triton_vs_raw_throughput |" in markdown
    assert "Backbone: dinov3 v1 (dinov3_demo, random-init demo backbone" in markdown
    assert markdown.strip() in result.stdout
