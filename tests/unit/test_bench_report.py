"""The bench's pure parts: metrics parsing, ratio arithmetic, markdown and chart (no servers, no timing)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.settings import Settings
from labelloop.bench import metric_sum, parse_metrics
from labelloop.bench_report import TARGETS, build_report, render_markdown, write_png
from labelloop.bench_rig import BackboneTally, BenchImage, BenchPlan, Tally, label_config
from ls_bridge.controls import plan_for_config
from ls_bridge.metrics import BridgeMetrics


def test_parse_metrics_reads_what_the_bridge_renders() -> None:
    metrics = BridgeMetrics()
    for seconds in (0.002, 0.004):
        metrics.stages.observe(seconds, stage="fetch")
    metrics.tasks.inc(outcome="failed")
    samples = parse_metrics(metrics.render())
    assert metric_sum(samples, "labelloop_bridge_stage_seconds_sum", stage="fetch") == pytest.approx(0.006)
    assert metric_sum(samples, "labelloop_bridge_stage_seconds_count", stage="fetch") == 2
    assert metric_sum(samples, "labelloop_bridge_stage_seconds_count", stage="infer") == 0
    assert metric_sum(samples, "labelloop_bridge_tasks_total", outcome="failed") == 1


def test_parse_metrics_sums_over_unnamed_labels() -> None:
    text = (
        "# HELP nv_inference_count x\n"
        'nv_inference_count{model="d",version="1"} 10\n'
        'nv_inference_count{model="d",version="2"} 5\n'
        'nv_inference_count{model="other",version="1"} 100\n'
    )
    samples = parse_metrics(text)
    assert metric_sum(samples, "nv_inference_count", model="d") == 15
    assert metric_sum(samples, "nv_inference_count", model="d", version="2") == 5


def test_label_config_has_one_label_per_class() -> None:
    plan = plan_for_config(label_config(["a", "b c"]), ("a", "b c"), 0.25)
    assert plan.value_keys == ("image",)
    assert dict(plan.controls[0].label_map) == {"a": "a", "b c": "b c"}


def _fake_run() -> tuple[Any, Any]:
    """A harness and monitor with round numbers, so every ratio is known."""
    tally = Tally()
    tally.latency["raw"] = [0.010] * 10
    tally.latency["triton"] = [0.012] * 10
    tally.latency["bridge"] = [0.020] * 10
    tally.latency["seed"] = [0.025] * 10
    tally.work[("raw", "batch 1")] = [100, 1.0]
    tally.work[("raw", "batch 8")] = [80, 0.8]
    tally.work[("triton", "concurrency 1")] = [80, 1.0]
    tally.work[("triton", "concurrency 8")] = [90, 1.0]
    for tasks, ips in ((1, 50), (8, 80), (64, 90)):
        tally.work[("bridge", f"{tasks} tasks/request" if tasks > 1 else "1 task/request")] = [ips, 1.0]
    tally.work[("seed", "1 image at a time")] = [40, 1.0]
    for stage in ("decode", "preprocess", "nms"):
        tally.stages[stage] = [0.0005, 0.0015]
    tally.stages["infer"] = [0.010]
    tally.stages["round_trip"] = [0.014, 0.016]
    tally.bridge_stages.update({"fetch": [0.02, 10], "format": [0.001, 10]})
    tally.json_s_per_task = [0.0001]
    tally.cpu["bridge 64 tasks/request"].update({"bridge": 0.18, "tritonserver": 0.01, "tritonserver children": 1.6})
    tally.cpu_images["bridge 64 tasks/request"] = 90
    tally.triton["bridge 64 tasks/request"].update(
        {
            "nv_inference_request_success": 90,
            "nv_inference_count": 90,
            "nv_inference_exec_count": 30,
            "nv_inference_queue_duration_us": 90_000,
            "nv_inference_compute_infer_duration_us": 2_700_000,
        }
    )
    harness = SimpleNamespace(
        tally=tally,
        settings=Settings(),
        info=SimpleNamespace(name="defect_detector", version=3, classes=["a", "b"], provider="CPUExecutionProvider"),
        imgsz=320,
        stride=32,
        images=[BenchImage("img000.jpg", b"x" * 2048, 640, 480), BenchImage("img001.jpg", b"x" * 1024, 320, 320)],
        plan=BenchPlan(images=2, rounds=1, block_images=64),
        seed_threads=2,
        conf0={"round_trip": [0.030, 0.050], "nms": [0.008, 0.012], "boxes": [300, 280]},
        jpeg_decode={
            "images": 2,
            "sizes": ["800x600", "1600x1200"],
            "reduced": 1,
            "decode_ms": {"full": 12.0, "fast": 4.0},
            "boxes": {"full": 5, "fast": 4},
            "agreement_f1": 0.8889,
            "enabled": False,
        },
    )
    monitor = SimpleNamespace(peak_mb={"bridge": 180.0, "tritonserver": 260.0}, processes={"tritonserver": 2})
    return harness, monitor


def _fake_backbone() -> BackboneTally:
    """Round numbers again: at 224 Triton keeps 0.8 of raw, at 448 0.95."""
    tally = BackboneTally(publish_s=12.3, measure_s=20.0, rounds=2)
    tally.model = {"name": "dinov3", "version": 1, "arch": "dinov3_demo", "patch_size": 16, "hidden_size": 192}
    tally.model |= {"layers": 4, "note": "random-init demo backbone", "provider": "CPUExecutionProvider"}
    for side, raw, triton in ((224, 0.005, 0.00625), (448, 0.020, 0.021)):
        tally.latency[("raw", side)] = [raw] * 4
        tally.latency[("pipeline", side)] = [raw + 0.001] * 4
        tally.latency[("triton", side)] = [triton] * 4
        tally.tokens[side] = [196, 168]
        tally.max_abs_diff[side] = 0.001
    tally.work[("triton concurrency 4", 224)] = [160, 1.0]
    tally.work[("raw", 224)] = [200, 1.0]
    tally.work[("pipeline", 224)] = [160, 1.0]
    tally.work[("triton concurrency 1", 224)] = [150, 1.0]
    tally.work[("triton concurrency 1", 448)] = [47.5, 1.0]
    tally.work[("pipeline", 448)] = [45, 1.0]
    tally.work[("raw", 448)] = [50, 1.0]
    tally.work[("triton concurrency 4", 448)] = [40, 1.0]
    return tally


def _report(backbone: bool = True) -> dict[str, Any]:
    harness, monitor = _fake_run()
    machine = {
        "cpu_model": "Test CPU",
        "cores_physical": 2,
        "cores_logical": 2,
        "memory_gib": 24.0,
        "load_average_before": (0.1, 0.1, 0.1),
        "load_average_after": (0.2, 0.1, 0.1),
    }
    return build_report(
        harness=harness,
        monitor=monitor,
        machine=machine,
        version=3,
        precision="int8",
        duration_s=60.0,
        backbone=_fake_backbone() if backbone else None,
    )


def test_build_report_ratios_follow_their_definitions() -> None:
    report = _report()
    ratios = report["ratios"]
    assert ratios["triton_vs_raw_p50"] == pytest.approx(1.2)
    # bridge at 64 tasks/request (90/s) over the best raw (100/s at batch 1)
    assert ratios["bridge_vs_raw_throughput"] == pytest.approx(0.9)
    assert ratios["bridge_vs_seed_throughput"] == pytest.approx(2.25)
    assert set(report["targets"]) == set(TARGETS)
    assert all(t["met"] for name, t in report["targets"].items() if not name.startswith("backbone"))
    load = report["per_load"]["bridge 64 tasks/request"]
    assert load["mean_batch"] == 3 and load["queue_ms"] == 1 and load["cpu_ms_python_stubs"] == pytest.approx(17.78)
    stages = {row["stage"]: row["ms"] for row in report["stages_ms"]}
    assert stages["fetch"] == pytest.approx(2.0) and stages["triton round trip"] == pytest.approx(15.0)
    assert stages["transport"] == pytest.approx(15.0 - 3.0 - 10.0)
    assert report["conf0"]["nms_ms"] == pytest.approx(10.0) and report["conf0"]["boxes_per_image"] == 290
    assert report["conf0"]["latency_ms"]["mean"] == pytest.approx(40.0)
    assert report["fast_jpeg_decode"]["agreement_f1"] == 0.8889


def test_the_backbone_ratio_is_the_lower_long_side_and_has_its_target() -> None:
    report = _report()
    sides = report["backbone"]["long_sides"]
    assert list(sides["224"]["throughput_images_per_s"]) == [
        "raw",
        "pipeline",
        "triton concurrency 1",
        "triton concurrency 4",
    ]
    assert sides["224"]["triton_vs_raw_throughput"] == pytest.approx(0.8)  # best Triton 160/s over raw 200/s
    assert sides["224"]["triton_vs_pipeline_throughput"] == pytest.approx(1.0)
    assert sides["448"]["triton_vs_raw_throughput"] == pytest.approx(0.95)
    assert sides["224"]["triton_vs_raw_p50"] == pytest.approx(1.25) and sides["224"]["tokens_per_image"] == 182
    assert report["ratios"]["backbone_triton_vs_raw_throughput"] == pytest.approx(0.8)
    target = report["targets"]["backbone_triton_vs_raw_throughput"]
    assert target == {"value": 0.8, "target": ">= 0.9", "met": False}
    assert report["all_targets_met"] is False
    markdown = render_markdown(report)
    assert "Backbone: dinov3 v1 (dinov3_demo, random-init demo backbone: 4 layers, hidden 192, patch 16)" in markdown
    assert "built and published in 12 s, loaded and measured (2 rounds) in 20 s." in markdown
    assert "| 224 | 200 | 160 | 150 | 160 | 0.8 | 1.0 |" in markdown
    assert "| 224 | 182.0 | (b) Triton | 6.25 | 6.25 |" in markdown
    assert "| backbone_triton_vs_raw_throughput | 0.8 | >= 0.9 | **no** |" in markdown
    without = _report(backbone=False)
    assert "backbone" not in without and "backbone_triton_vs_raw_throughput" not in without["targets"]
    assert without["all_targets_met"] is True and "Backbone:" not in render_markdown(without)


def test_markdown_and_png(tmp_path: Path) -> None:
    report = _report()
    report["targets"]["bridge_vs_seed_throughput"]["met"] = False
    markdown = render_markdown(report)
    assert "| ratio | value | target | met |" in markdown
    assert "| bridge_vs_seed_throughput | 2.25 | >= 2 | **no** |" in markdown
    assert "| (a) raw onnxruntime | 10.00 | 10.00 | 10.00 |" in markdown
    assert "Test CPU, 2 cores" in markdown and "imgsz 320, int8, " in markdown
    assert "letterbox rect (stride 32);" in markdown
    assert "| lone requests | 40.00 |" in markdown and "| 10.00 | 290.0 |" in markdown
    assert "| off (full decode, the default) | 12.00 | 5 |" in markdown
    assert "| on (1 decoded reduced) | 4.00 | 4 |" in markdown
    write_png(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
