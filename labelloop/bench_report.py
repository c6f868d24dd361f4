"""The bench's report: one JSON-ready dict, its markdown tables and its chart.

Ratios are taken within one run (the machines are noisy, ratios travel better than times):

``triton_vs_raw_p50``         p50 single-image latency of (b) Triton ÷ p50 of (a) raw ``session.run``.
``bridge_vs_raw_throughput``  images/s of (c) the bridge at 64 tasks per request ÷ the best images/s
                              of (a) raw onnxruntime (batch 1 or batch ``max_batch_size``).
``bridge_vs_seed_throughput`` images/s of (c) at 64 tasks per request ÷ images/s of (d) the seed.
``backbone_triton_vs_raw_throughput`` the demo backbone's images/s through Triton (best concurrency)
                              ÷ raw ``session.run``'s, at each long side; the lower of the two.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from core.settings import Settings
    from labelloop.bench_rig import BackboneTally, BenchImage, BenchPlan, ProcessMonitor, Tally
    from serving.client import ModelInfo

__all__ = [
    "METHODS",
    "RATIO_DEFINITIONS",
    "TARGETS",
    "backbone_section",
    "backbone_tables",
    "build_report",
    "render_markdown",
    "segmenter_lines",
    "write_png",
]

METHODS: dict[str, str] = {
    "raw": "(a) onnxruntime InferenceSession(served ONNX, default options: all cores, ORT_ENABLE_ALL).run on the "
    "float32 tensor the Triton model builds for the image (its own rectangle with rect), in the bench process; "
    "decode, letterbox and NMS are outside the timer; batch max_batch_size: one full batch per network shape, "
    "weighted by the images of that shape",
    "triton": "(b) DetectorClient.detect(JPEG bytes) over gRPC on a kept-alive channel: decode, EXIF, letterbox, "
    "onnxruntime and NMS inside Triton's python model; boxes in original pixels back",
    "bridge": "(c) POST /predict to the bridge process with one Label Studio task per image (http image URL on a "
    "loopback server): fetch, Triton, Label Studio regions, JSON; timed until the parsed response",
    "seed": "(d) ultralytics YOLO(weights.pt).predict(PIL image from the bytes) in-process, one image at a time, "
    "torch on the threads ultralytics chooses, the model loaded once (the seed reloaded it per request: "
    "not charged here)",
}

RATIO_DEFINITIONS: dict[str, str] = {
    "triton_vs_raw_p50": "p50 latency of (b) Triton, one image per request ÷ p50 latency of (a) raw session.run "
    "on one preprocessed image",
    "bridge_vs_raw_throughput": "images/s of (c) the bridge, 64 tasks per /predict request, one request at a time "
    "÷ best images/s of (a) raw session.run (batch 1 or batch max_batch_size)",
    "bridge_vs_seed_throughput": "images/s of (c) the bridge, 64 tasks per /predict request ÷ images/s of (d) the "
    "seed's ultralytics predict, one image at a time",
    "triton_vs_raw_throughput": "best images/s of (b) Triton (concurrency 1-8) ÷ best images/s of (a) raw",
    "bridge_vs_raw_p50": "p50 latency of (c) the bridge with a 1-task request ÷ p50 latency of (a)",
    "seed_vs_raw_p50": "p50 latency of (d) the seed ÷ p50 latency of (a)",
    "backbone_triton_vs_raw_throughput": "the demo backbone: best images/s of Triton (FeaturesClient.embed of the "
    "JPEG, concurrency 1 or 4) ÷ images/s of raw session.run on the tensor Triton builds, one image at a time; "
    "the lower of long sides 224 and 448",
}

# name -> (comparison, bound); bridge_peak_rss_mb is not a ratio but is a target of the issue.
TARGETS: dict[str, tuple[str, float]] = {
    "triton_vs_raw_p50": ("<=", 1.3),
    "bridge_vs_raw_throughput": (">=", 0.85),
    "bridge_vs_seed_throughput": (">=", 2.0),
    "bridge_peak_rss_mb": ("<", 300.0),
    "backbone_triton_vs_raw_throughput": (">=", 0.9),
}

BACKBONE_METHODS: dict[str, str] = {
    "raw": "(a) onnxruntime InferenceSession(served ONNX, default options).run on the float32 tensor the Triton "
    "model builds (decode, resize, normalise outside the timer), one image at a time",
    "pipeline": "(p) the same in the bench process with decode, resize and normalise inside the timer",
    "triton": "(b) FeaturesClient.embed(JPEG bytes, long side) over gRPC: decode, EXIF, resize, normalise, "
    "onnxruntime inside Triton's python model, fp16 tokens back",
}

_IN_MODEL = "the Triton model's own clock (STAGE_MS), lone requests"
_STAGE_SOURCES: list[tuple[str, str, str]] = [
    ("fetch", "bridge", "bridge /metrics (stage=fetch), 1-task requests"),
    ("decode", "Triton model", _IN_MODEL),
    ("preprocess", "Triton model", f"letterbox + NCHW float32 / 255: {_IN_MODEL}"),
    ("infer", "Triton model", f"onnxruntime session.run: {_IN_MODEL}; (a) times the same call back to back"),
    ("nms", "Triton model", f"NMS + un-letterbox: {_IN_MODEL}"),
    ("triton round trip", "bench -> Triton", "DetectorClient.detect of the same requests: gRPC + all of the above"),
    ("transport", "gRPC + python backend", "triton round trip - (decode + preprocess + infer + nms), per request"),
    ("format", "bridge", "bridge /metrics (stage=format): detections to Label Studio regions"),
    ("json", "bridge", "PredictResponse model_dump + json.dumps of a real response, per task, bench process"),
]


def _ms(samples: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(samples) * 1e3
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "mean": round(float(arr.mean()), 3),
        "n": len(samples),
    }


def _stages(harness: Harness) -> list[dict[str, Any]]:
    from serving.client import STAGES

    tally = harness.tally
    mean = {name: statistics.fmean(values) * 1e3 for name, values in tally.stages.items() if values}
    for stage, (seconds, count) in tally.bridge_stages.items():
        mean[stage] = seconds / count * 1e3 if count else float("nan")
    mean["json"] = statistics.fmean(tally.json_s_per_task) * 1e3 if tally.json_s_per_task else float("nan")
    mean["triton round trip"] = mean.pop("round_trip", float("nan"))
    mean["transport"] = mean["triton round trip"] - sum(mean.get(k, float("nan")) for k in STAGES)
    return [
        {"stage": stage, "ms": round(mean.get(stage, float("nan")), 3), "runs_in": where, "measured": how}
        for stage, where, how in _STAGE_SOURCES
    ]


_ROLES = {
    "bridge": "bridge",
    "tritonserver": "tritonserver",
    "tritonserver children": "python stubs",
    "bench process": "bench process",
}


def _per_load(harness: Harness, throughput: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per Triton-bound load: wall and CPU ms per image by process, and Triton's batching and queueing."""
    tally = harness.tally
    rows = {}
    for load, images in tally.cpu_images.items():
        method, _, rest = load.partition(" ")
        ips = throughput.get(method, {}).get(rest)
        if not images or not ips:
            continue
        row: dict[str, float] = {"images_per_s": ips, "wall_ms": round(1e3 / ips, 2)}
        cpu = tally.cpu[load]
        for role, label in _ROLES.items():
            if role in cpu:
                row[f"cpu_ms_{label.replace(' ', '_')}"] = round(cpu[role] / images * 1e3, 2)
        row["cpu_ms_total"] = round(sum(cpu.values()) / images * 1e3, 2)
        counters = tally.triton[load]
        requests = counters["nv_inference_request_success"]
        if requests and counters["nv_inference_exec_count"]:
            row["mean_batch"] = round(counters["nv_inference_count"] / counters["nv_inference_exec_count"], 2)
            row["queue_ms"] = round(counters["nv_inference_queue_duration_us"] / requests / 1e3, 2)
            row["execute_ms"] = round(counters["nv_inference_compute_infer_duration_us"] / requests / 1e3, 2)
        rows[load] = row
    return dict(sorted(rows.items(), key=lambda item: (item[0].split()[0], _load_order(item[0]))))


def _load_order(load: str) -> int:
    """'batch 8', 'concurrency 2', '64 tasks/request' sort by their number."""
    match = re.search(r"\d+", load)
    return int(match.group()) if match else 0


class Harness(Protocol):
    """What the report reads of a bench run (``labelloop.bench.Harness`` is one)."""

    settings: Settings
    plan: BenchPlan
    images: list[BenchImage]
    info: ModelInfo
    imgsz: int
    stride: int | None
    seed_threads: int
    tally: Tally
    conf0: dict[str, list[float]]
    jpeg_decode: dict[str, Any]


def _conf0(harness: Harness) -> dict[str, Any]:
    """Triton at score threshold 0 (every anchor a candidate): latency, NMS and boxes per image."""
    runs = harness.conf0
    if not runs.get("round_trip"):
        return {}
    return {
        "latency_ms": _ms(runs["round_trip"]),
        "nms_ms": round(statistics.fmean(runs["nms"]) * 1e3, 3),
        "boxes_per_image": round(statistics.fmean(runs["boxes"]), 1),
    }


def _backbone_order(load: str) -> tuple[int, int]:
    """raw, pipeline, then Triton by concurrency."""
    return ({"raw": 0, "pipeline": 1}.get(load, 2), _load_order(load))


def backbone_section(tally: BackboneTally) -> dict[str, Any]:
    """The backbone section: per long side, latency and throughput of each method, and Triton over raw."""
    sides: dict[str, Any] = {}
    for side in sorted({side for _, side in tally.work}):
        throughput = {
            load: round(images / seconds, 2)
            for (load, s), (images, seconds) in sorted(tally.work.items(), key=lambda item: _backbone_order(item[0][0]))
            if s == side and seconds > 0
        }
        latency = {m: _ms(tally.latency[(m, side)]) for m in BACKBONE_METHODS if tally.latency.get((m, side))}
        best_triton = max((v for k, v in throughput.items() if k.startswith("triton")), default=0.0)
        raw, pipeline = throughput.get("raw", 0.0), throughput.get("pipeline", 0.0)
        tokens = tally.tokens.get(side) or [0]
        sides[str(side)] = {
            "tokens_per_image": round(statistics.fmean(tokens), 1),
            "latency_ms": latency,
            "throughput_images_per_s": throughput,
            "triton_vs_raw_throughput": round(best_triton / raw, 3) if raw else None,
            "triton_vs_pipeline_throughput": round(best_triton / pipeline, 3) if pipeline else None,
            "triton_vs_raw_p50": (
                round(latency["triton"]["p50"] / latency["raw"]["p50"], 3)
                if "triton" in latency and "raw" in latency
                else None
            ),
            "max_abs_diff_triton_vs_raw": tally.max_abs_diff.get(side),
        }
    return {
        "model": tally.model,
        "rounds": tally.rounds,
        "publish_s": round(tally.publish_s, 1),
        "measure_s": round(tally.measure_s, 1),
        "methods": BACKBONE_METHODS,
        "long_sides": sides,
    }


def _check(value: float, comparison: str, bound: float) -> bool:
    return {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[comparison]


def build_report(
    harness: Harness,
    monitor: ProcessMonitor,
    machine: dict[str, Any],
    version: int,
    precision: str,
    duration_s: float,
    backbone: BackboneTally | None = None,
) -> dict[str, Any]:
    """Everything the bench measured, JSON-ready, with the ratios and whether the targets hold.

    Without a ``backbone`` tally the report has no backbone section, ratio or target.
    """
    tally, settings, info = harness.tally, harness.settings, harness.info
    latency = {m: _ms(tally.latency[m]) for m in METHODS}
    throughput: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for (method, load), (images, seconds) in sorted(tally.work.items(), key=lambda item: _load_order(item[0][1])):
        throughput[method][load] = round(images / seconds, 2)
    best_raw = max(throughput["raw"].values())
    bridge_bulk = throughput["bridge"]["64 tasks/request"]
    seed = throughput["seed"]["1 image at a time"]
    ratios = {
        "triton_vs_raw_p50": latency["triton"]["p50"] / latency["raw"]["p50"],
        "bridge_vs_raw_throughput": bridge_bulk / best_raw,
        "bridge_vs_seed_throughput": bridge_bulk / seed,
        "triton_vs_raw_throughput": max(throughput["triton"].values()) / best_raw,
        "bridge_vs_raw_p50": latency["bridge"]["p50"] / latency["raw"]["p50"],
        "seed_vs_raw_p50": latency["seed"]["p50"] / latency["raw"]["p50"],
    }
    section = backbone_section(backbone) if backbone is not None else None
    if section is not None:
        per_side = [row["triton_vs_raw_throughput"] for row in section["long_sides"].values()]
        if per_side and None not in per_side:
            ratios["backbone_triton_vs_raw_throughput"] = min(per_side)
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    peak = {
        "bridge": round(monitor.peak_mb["bridge"], 1),
        "triton": round(monitor.peak_mb["tritonserver"], 1),
        "triton_processes": monitor.processes["tritonserver"],
    }
    checked = {**ratios, "bridge_peak_rss_mb": peak["bridge"]}
    targets = {
        name: {"value": checked[name], "target": f"{cmp} {bound:g}", "met": _check(checked[name], cmp, bound)}
        for name, (cmp, bound) in TARGETS.items()
        if name in checked
    }
    sides = [(i.width, i.height) for i in harness.images]
    return {
        "machine": machine,
        "setup": {
            "model": info.name,
            "version": version,
            "imgsz": harness.imgsz,
            "letterbox": f"rect (stride {harness.stride})" if harness.stride else "square",
            "precision": precision,
            "classes": info.classes,
            "provider": info.provider,
            "images": len(harness.images),
            "image_format": "JPEG quality 90, synthetic (trainer.synthetic)",
            "image_pixels": f"{min(w * h for w, h in sides)}-{max(w * h for w, h in sides)}",
            "image_kb_median": round(statistics.median(len(i.data) for i in harness.images) / 1024, 1),
            "rounds": harness.plan.rounds,
            "images_per_throughput_block": harness.plan.block_images,
            "settings": {
                "instance_count": settings.instance_count,
                "ort_threads": settings.ort_threads,
                "max_batch_size": settings.max_batch_size,
                "batch_delay_us": settings.batch_delay_us,
                "triton_concurrency": settings.triton_concurrency,
                "fetch_concurrency": settings.fetch_concurrency,
                "conf": settings.conf,
                "iou": settings.iou,
                "fast_jpeg_decode": settings.fast_jpeg_decode,
            },
            "seed_torch_threads": harness.seed_threads,
        },
        "methods": METHODS,
        "latency_ms": latency,
        "boxes_per_image": {m: round(statistics.fmean(tally.boxes[m]), 2) for m in METHODS if tally.boxes[m]},
        "throughput_images_per_s": throughput,
        "peak_rss_mb": peak,
        "stages_ms": _stages(harness),
        "conf0": _conf0(harness),
        "fast_jpeg_decode": harness.jpeg_decode,
        "per_load": _per_load(harness, throughput),
        **({"backbone": section} if section is not None else {}),
        "ratios": ratios,
        "ratio_definitions": RATIO_DEFINITIONS,
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "duration_s": round(duration_s, 1),
    }


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (what the README's Performance section pastes)."""
    m, s = report["machine"], report["setup"]
    cfg = s["settings"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cores_physical']} cores ({m['cores_logical']} logical), "
        f"{m['memory_gib']} GiB, no GPU; load average {m['load_average_before'][0]:.2f} before, "
        f"{m['load_average_after'][0]:.2f} after (1 min).",
        f"Model: {s['model']} v{s['version']}, imgsz {s['imgsz']}, {s['precision']}, {len(s['classes'])} classes, "
        f"{s['provider']}, letterbox {s['letterbox']}; "
        f"{s['images']} JPEG images ({s['image_pixels']} pixels, median {s['image_kb_median']} KB), "
        f"{s['rounds']} rounds, {report['duration_s']:.0f} s.",
        f"Serving: {cfg['instance_count']} instance(s) x {cfg['ort_threads'] or 'all'} onnxruntime thread(s), "
        f"max batch {cfg['max_batch_size']}, batch delay {cfg['batch_delay_us']} us; bridge fetch concurrency "
        f"{cfg['fetch_concurrency']}, Triton concurrency {cfg['triton_concurrency']}; seed: torch on "
        f"{s['seed_torch_threads']} thread(s).",
        "",
    ]
    names = {"raw": "(a) raw onnxruntime", "triton": "(b) Triton gRPC", "bridge": "(c) bridge /predict"}
    names["seed"] = "(d) seed ultralytics"
    boxes = report["boxes_per_image"]
    lines += _table(
        ["single image", "p50 ms", "p95 ms", "p99 ms", "boxes/image"],
        [
            [names[k], _fmt(v["p50"]), _fmt(v["p95"]), _fmt(v["p99"]), boxes.get(k, "")]
            for k, v in report["latency_ms"].items()
        ],
    )
    lines += _table(
        ["throughput", "load", "images/s"],
        [
            [names[k], load, _fmt(ips)]
            for k, loads in report["throughput_images_per_s"].items()
            for load, ips in loads.items()
        ],
    )
    lines += _table(
        ["stage (mean per image)", "ms", "runs in", "measured by"],
        [[r["stage"], _fmt(r["ms"]), r["runs_in"], r["measured"]] for r in report["stages_ms"]],
    )
    per_load = report["per_load"]
    if per_load:
        columns = ["images_per_s", "wall_ms", "cpu_ms_bridge", "cpu_ms_tritonserver", "cpu_ms_python_stubs"]
        columns += ["cpu_ms_bench_process", "cpu_ms_total", "mean_batch", "queue_ms", "execute_ms"]
        lines += _table(
            ["load", "images/s", "wall ms/img", "CPU ms/img: bridge", "tritonserver", "python stubs", "bench"]
            + ["all", "Triton mean batch", "queue ms", "execute ms"],
            [[load, *(row.get(c, "") for c in columns)] for load, row in per_load.items()],
        )
    conf0 = report.get("conf0")
    if conf0:
        lat = conf0["latency_ms"]
        lines += _table(
            ["(b) Triton at score threshold 0", "p50 ms", "p95 ms", "NMS ms (mean)", "boxes/image"],
            [["lone requests", _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(conf0["nms_ms"]), conf0["boxes_per_image"]]],
        )
    jpeg = report.get("fast_jpeg_decode")
    if jpeg:
        ms, boxes = jpeg["decode_ms"], jpeg["boxes"]
        lines += _table(
            [f"fast_jpeg_decode ({jpeg['images']} JPEGs {', '.join(jpeg['sizes'])})", "decode ms (mean)", "boxes"],
            [
                ["off (full decode, the default)", _fmt(ms["full"]), boxes["full"]],
                [f"on ({jpeg['reduced']} decoded reduced)", _fmt(ms["fast"]), boxes["fast"]],
                ["agreement of on with off (F1, same class, IoU >= 0.5)", jpeg["agreement_f1"], ""],
            ],
        )
    lines += backbone_tables(report.get("backbone"))
    lines += segmenter_lines(report.get("segmenter"))
    peak = report["peak_rss_mb"]
    lines += _table(
        ["process", "peak RSS MB"],
        [["bridge", peak["bridge"]], [f"Triton ({peak['triton_processes']} processes, summed)", peak["triton"]]],
    )
    targets = report["targets"]
    lines += _table(
        ["ratio", "value", "target", "met"],
        [
            [name, value, targets[name]["target"] if name in targets else "", _met(targets, name)]
            for name, value in [*report["ratios"].items(), ("bridge_peak_rss_mb", peak["bridge"])]
        ],
    )
    return "\n".join(lines)


def backbone_tables(section: dict[str, Any] | None) -> list[str]:
    """The backbone's latency and throughput per long side, with Triton over raw."""
    if not section:
        return []
    model = section["model"]
    note = f", {model['note']}" if model.get("note") else ""
    lines = [
        f"Backbone: {model['name']} v{model['version']} ({model['arch']}{note}: {model.get('layers')} layers, "
        f"hidden {model['hidden_size']}, patch {model['patch_size']}), {model.get('provider', '')}; "
        f"built and published in {section['publish_s']:.0f} s, loaded and measured ({section['rounds']} rounds) "
        f"in {section['measure_s']:.0f} s.",
        "",
    ]
    names = {"raw": "(a) raw session.run", "pipeline": "(p) decode + resize + run, in-process", "triton": "(b) Triton"}
    rows = []
    for side, row in section["long_sides"].items():
        for method, stats in row["latency_ms"].items():
            rows.append(
                [side, row["tokens_per_image"], names.get(method, method), _fmt(stats["p50"]), _fmt(stats["p95"])]
            )
    lines += _table(["long side", "tokens/image", "single image", "p50 ms", "p95 ms"], rows)
    rows = []
    for side, row in section["long_sides"].items():
        loads = row["throughput_images_per_s"]
        rows.append(
            [
                side,
                *(_fmt(v) for v in loads.values()),
                row["triton_vs_raw_throughput"],
                row["triton_vs_pipeline_throughput"],
            ]
        )
    loads = next(iter(section["long_sides"].values()))["throughput_images_per_s"] if section["long_sides"] else {}
    lines += _table(["long side", *(f"{load} images/s" for load in loads), "Triton ÷ raw", "Triton ÷ pipeline"], rows)
    return lines


def segmenter_lines(section: dict[str, Any] | None) -> list[str]:
    """The interactive click's latency (``labelloop.bench_segmenter``): a line and a one-row table."""
    if not section:
        return []
    model = section["model"]
    width, height = section["image_size"]
    target = "met" if section["target_met"] else "NOT met"
    lines = [
        f"Interactive segmentation: {model['name']} v{model['version']} on {model['backbone']} at long side "
        f"{model['long_side']} (trained on {model['train_images']} synthetic blob images, {model['epochs']} epochs, "
        f"{section['train_s']:.0f} s); {section['images']} JPEG images {width} x {height}, one plain call then "
        f"{section['clicks_per_image']} clicks each, timed as the bridge: predict_image + answer (upsample, honour "
        f"clicks, RLE). interactive_click_p50_ms {section['interactive_click_p50_ms']} "
        f"(target <= {section['target_p50_ms']:g}: {target}).",
        "",
    ]
    lines += _table(
        ["interactive segmentation", "calls", "p50 ms", "p90 ms", "mean ms"],
        [
            [
                "click (cached tokens)",
                section["interactive_click_n"],
                _fmt(section["interactive_click_p50_ms"]),
                _fmt(section["interactive_click_p90_ms"]),
                "",
            ],
            ["first call (backbone included)", section["images"], "", "", _fmt(section["first_call_mean_ms"])],
        ],
    )
    return lines


def _met(targets: dict[str, Any], name: str) -> str:
    if name not in targets:
        return ""
    return "yes" if targets[name]["met"] else "**no**"


def write_png(report: dict[str, Any], path: Path) -> None:
    """Latency, throughput, stages and ratios in one figure (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    lat = report["latency_ms"]
    methods = list(lat)
    p50 = [lat[k]["p50"] for k in methods]
    p95 = [lat[k]["p95"] for k in methods]
    ax = axes[0][0]
    ax.bar(methods, p50, label="p50")
    ax.scatter(methods, p95, color="black", marker="_", s=400, label="p95", zorder=3)
    ax.set_ylabel("ms per image")
    ax.set_title("Single-image latency")
    ax.legend()

    ax = axes[0][1]
    labels, values = [], []
    for method, loads in report["throughput_images_per_s"].items():
        for load, ips in loads.items():
            labels.append(f"{method}\n{load}")
            values.append(ips)
    ax.barh(labels, values)
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    ax.set_title("Throughput")
    ax.tick_params(axis="y", labelsize=7)

    ax = axes[1][0]
    stages = [r for r in report["stages_ms"] if math.isfinite(r["ms"])]
    ax.barh([r["stage"] for r in stages], [r["ms"] for r in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (mean)")
    ax.set_title("Where the time goes")

    ax = axes[1][1]
    targets = report["targets"]
    names = [n for n in targets if n in report["ratios"]]
    values = [report["ratios"][n] for n in names]
    colours = ["tab:green" if targets[n]["met"] else "tab:red" for n in names]
    ax.bar(names, values, color=colours)
    for i, name in enumerate(names):
        bound = float(targets[name]["target"].split()[-1])
        ax.hlines(bound, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    ax.set_title("Ratios (dashed: target)")
    ax.tick_params(axis="x", labelsize=8)

    m = report["machine"]
    fig.suptitle(
        f"labelloop bench: {report['setup']['model']} v{report['setup']['version']}, imgsz "
        f"{report['setup']['imgsz']}, {m['cpu_model']} ({m['cores_logical']} cores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
