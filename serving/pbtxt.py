"""Render Triton ``config.pbtxt`` files for the detector's runtime variants.

``python``: the whole detector (decode, letterbox, onnxruntime, NMS) in one python-backend model.
``onnxruntime``: for NVIDIA's Triton container, an ensemble of python pre-processing, the ONNX on
the ``onnxruntime_onnx`` backend (optionally TensorRT FP16) and python post-processing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "BackboneConfig",
    "ClassifierConfig",
    "DetectorConfig",
    "SegmenterConfig",
    "render_backbone",
    "render_classifier",
    "render_core_onnx",
    "render_ensemble",
    "render_python",
    "render_segmenter",
    "render_stage",
]


@dataclass(frozen=True)
class DetectorConfig:
    """Knobs of a detector's Triton config; defaults suit a 2-core CPU box."""

    name: str = "defect_detector"
    max_batch_size: int = 8
    batch_delay_us: int = 0
    instance_count: int = 2
    kind: str = "KIND_CPU"
    intra_op_threads: int = 0
    score_threshold: float = 0.25
    iou_threshold: float = 0.7
    max_image_bytes: int = 50_000_000
    max_image_pixels: int = 60_000_000
    imgsz: int = 320
    rect: bool = True
    fast_jpeg_decode: bool = False
    tensorrt_fp16: bool = True


def _quoted(value: object) -> str:
    """A protobuf text string literal (backslashes and quotes escaped)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(values: dict[str, object]) -> str:
    rows = [f'  {{ key: "{k}" value: {{ string_value: {_quoted(v)} }} }}' for k, v in values.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]\n"


def _tensors(kind: str, rows: list[tuple[str, str, str]]) -> str:
    body = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in rows)
    return f"{kind} [\n{body}\n]\n"


_IMAGE_IN = [("IMAGE", "TYPE_STRING", "1")]
_DETECTOR_OUT = [
    ("DETECTIONS", "TYPE_FP32", "-1, 6"),
    ("NUM_DETECTIONS", "TYPE_INT32", "1"),
    ("IMAGE_SIZE", "TYPE_INT32", "2"),
    ("MODEL_INFO", "TYPE_STRING", "1"),
]
# Per-image decode / preprocess / infer / NMS milliseconds, timed inside the one-model variant.
_STAGES_OUT = [("STAGE_MS", "TYPE_FP32", "4")]


def _batching(cfg: DetectorConfig) -> str:
    return (
        f"max_batch_size: {cfg.max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.batch_delay_us} }}\n"
    )


def _instances(cfg: DetectorConfig, kind: str | None = None) -> str:
    return f"instance_group [ {{ count: {cfg.instance_count} kind: {kind or cfg.kind} }} ]\n"


def _limits(cfg: DetectorConfig) -> dict[str, object]:
    return {
        "score_threshold": cfg.score_threshold,
        "iou_threshold": cfg.iou_threshold,
        "max_image_bytes": cfg.max_image_bytes,
        "max_image_pixels": cfg.max_image_pixels,
        "fast_jpeg_decode": str(cfg.fast_jpeg_decode).lower(),
    }


def render_python(cfg: DetectorConfig) -> str:
    """The one-model variant served by the python backend (this machine, any Triton)."""
    return (
        f'name: "{cfg.name}"\nbackend: "python"\n'
        + _batching(cfg)
        + _tensors("input", _IMAGE_IN)
        + _tensors("output", _DETECTOR_OUT + _STAGES_OUT)
        + _instances(cfg)
        # Serve only the newest version that loads; older ones stay on disk for rollback.
        + "version_policy: { latest: { num_versions: 1 } }\n"
        + _parameters(
            {
                "stage": "full",
                "intra_op_threads": cfg.intra_op_threads,
                "rect": str(cfg.rect).lower(),
                **_limits(cfg),
            }
        )
    )


def render_stage(cfg: DetectorConfig, stage: str) -> str:
    """A python pre- or post-processing step of the ensemble (same model.py, ``stage`` parameter)."""
    if stage == "preprocess":
        ios = _tensors("input", _IMAGE_IN) + _tensors(
            "output",
            [("PIXELS", "TYPE_FP32", f"3, {cfg.imgsz}, {cfg.imgsz}"), ("LETTERBOX", "TYPE_INT32", "6")],
        )
    elif stage == "postprocess":
        ios = _tensors(
            "input",
            [("PREDICTIONS", "TYPE_FP32", "-1, -1"), ("LETTERBOX", "TYPE_INT32", "6")],
        ) + _tensors("output", _DETECTOR_OUT)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return (
        f'name: "{cfg.name}_{stage}"\nbackend: "python"\n'
        + _batching(cfg)
        + ios
        + _instances(cfg, "KIND_CPU")
        + _parameters({"stage": stage, **_limits(cfg)})
    )


def render_core_onnx(cfg: DetectorConfig, backend: str = "onnxruntime") -> str:
    """The ONNX on Triton's onnxruntime backend, with TensorRT FP16 and an engine cache on GPUs.

    ``backend="python"`` runs the same ONNX through the python backend's ``infer`` stage: the
    stand-in for Triton builds without the onnxruntime backend (like the pytriton wheel's).
    ``backend="tensorrt"`` expects ``model.plan`` built on the target (Jetson) with ``trtexec``.
    """
    accel = ""
    if cfg.tensorrt_fp16 and cfg.kind == "KIND_GPU":
        accel = (
            "optimization { execution_accelerators { gpu_execution_accelerator : [ {\n"
            '  name : "tensorrt"\n'
            '  parameters { key: "precision_mode" value: "FP16" }\n'
            '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            '  parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            '  parameters { key: "trt_engine_cache_path" value: "/tmp/triton_trt_cache" }\n'
            "} ] } }\n"
        )
    runtime = 'platform: "onnxruntime_onnx"\n'
    if backend == "tensorrt":  # Jetson: a plan built on the device with trtexec (see deploy/jetson.md)
        runtime, accel = 'platform: "tensorrt_plan"\n', ""
    elif backend == "python":
        runtime = 'backend: "python"\n'
        accel = _parameters({"stage": "infer", "intra_op_threads": cfg.intra_op_threads})
    return (
        f'name: "{cfg.name}_onnx"\n'
        + runtime
        + _batching(cfg)
        + _tensors("input", [("images", "TYPE_FP32", f"3, {cfg.imgsz}, {cfg.imgsz}")])
        + _tensors("output", [("output0", "TYPE_FP32", "-1, -1")])
        + _instances(cfg)
        + "version_policy: { latest: { num_versions: 1 } }\n"
        + accel
    )


def render_ensemble(cfg: DetectorConfig) -> str:
    """Ties preprocess -> onnx -> postprocess under the detector's public name and I/O."""
    step = '  {{ model_name: "{m}" model_version: -1\n{maps}  }}'

    def maps(kind: str, pairs: list[tuple[str, str]]) -> str:
        return "".join(f'    {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)

    steps = [
        step.format(
            m=f"{cfg.name}_preprocess",
            maps=maps("input_map", [("IMAGE", "IMAGE")])
            + maps("output_map", [("PIXELS", "pixels"), ("LETTERBOX", "letterbox")]),
        ),
        step.format(
            m=f"{cfg.name}_onnx",
            maps=maps("input_map", [("images", "pixels")]) + maps("output_map", [("output0", "predictions")]),
        ),
        step.format(
            m=f"{cfg.name}_postprocess",
            maps=maps("input_map", [("PREDICTIONS", "predictions"), ("LETTERBOX", "letterbox")])
            + maps("output_map", [(n, n) for n, _, _ in _DETECTOR_OUT]),
        ),
    ]
    return (
        f'name: "{cfg.name}"\nplatform: "ensemble"\nmax_batch_size: {cfg.max_batch_size}\n'
        + _tensors("input", _IMAGE_IN)
        + _tensors("output", _DETECTOR_OUT)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


# Backbone (DINOv3 features) ------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneConfig:
    """Knobs of a backbone's features model (python backend running onnxruntime).

    Two CPU instances: one decodes and resizes while the other runs the network, each on one
    onnxruntime thread while both execute, on all cores while one runs alone (docs/performance.md).
    """

    name: str = "dinov3"
    max_batch_size: int = 8
    batch_delay_us: int = 0
    instance_count: int = 2
    kind: str = "KIND_CPU"
    intra_op_threads: int = 0
    long_side: int = 448
    max_long_side: int = 2048
    max_image_bytes: int = 50_000_000
    max_image_pixels: int = 60_000_000


def render_backbone(cfg: BackboneConfig) -> str:
    """The features model: an encoded image (and optional long side) in, fp16 patch tokens out.

    Outputs per image: TOKENS (h, w, C) fp16, GRID (h, w), SIZE (resized width, height), IMAGE_SIZE
    (width, height after EXIF) and MODEL_INFO (JSON, on request). A request may carry several images
    only if they resize to one grid; clients send one image per request.
    """
    # LONG_SIDE is optional: without it the request parameter ``long_side``, else the config's, applies.
    inputs = (
        "input [\n"
        '  { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] },\n'
        '  { name: "LONG_SIDE" data_type: TYPE_INT32 dims: [ 1 ] optional: true }\n'
        "]\n"
    )
    outputs = [
        ("TOKENS", "TYPE_FP16", "-1, -1, -1"),
        ("GRID", "TYPE_INT32", "2"),
        ("SIZE", "TYPE_INT32", "2"),
        ("IMAGE_SIZE", "TYPE_INT32", "2"),
        ("MODEL_INFO", "TYPE_STRING", "1"),
    ]
    return (
        f'name: "{cfg.name}"\nbackend: "python"\n'
        f"max_batch_size: {cfg.max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.batch_delay_us} }}\n"
        + inputs
        + _tensors("output", outputs)
        + f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.kind} }} ]\n"
        + "version_policy: { latest: { num_versions: 1 } }\n"
        + _parameters(
            {
                "intra_op_threads": cfg.intra_op_threads,
                "long_side": cfg.long_side,
                "max_long_side": cfg.max_long_side,
                "max_image_bytes": cfg.max_image_bytes,
                "max_image_pixels": cfg.max_image_pixels,
            }
        )
    )


@dataclass(frozen=True)
class ClassifierConfig:
    """Knobs of a classifier head's model; ``kind``/``backbone`` let a client find it without an inference."""

    name: str
    backbone: str
    classes: tuple[str, ...]
    max_batch_size: int = 8
    instance_count: int = 1
    intra_op_threads: int = 1

    def render(self) -> str:
        return render_classifier(self)


def _head_tail(kind: str, backbone: str, classes: tuple[str, ...], instances: int, **extra: object) -> str:
    """What every head's config ends with: instances, version policy, and the parameters the bridge reads."""
    return (
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
        + "version_policy: { latest: { num_versions: 1 } }\n"
        + _parameters({"labelloop_kind": kind, "backbone": backbone, "classes": json.dumps(list(classes)), **extra})
    )


def render_classifier(cfg: ClassifierConfig) -> str:
    """The head model: an encoded image in, class probabilities out (the backbone reached by BLS)."""
    outputs = [("PROBS", "TYPE_FP32", "-1"), ("MODEL_INFO", "TYPE_STRING", "1")]
    return (
        f'name: "{cfg.name}"\nbackend: "python"\n'
        + _batching_plain(cfg.max_batch_size)
        + _tensors("input", _IMAGE_IN)
        + _tensors("output", outputs)
        + _head_tail(
            "classifier",
            cfg.backbone,
            cfg.classes,
            cfg.instance_count,
            intra_op_threads=cfg.intra_op_threads,
        )
    )


@dataclass(frozen=True)
class SegmenterConfig:
    """Knobs of a segmenter head's model; ``feature_cache_mb`` bounds the tokens kept for interactive clicks."""

    name: str
    backbone: str
    classes: tuple[str, ...]
    instance_count: int = 1
    intra_op_threads: int = 1
    feature_cache_mb: int = 256

    def render(self) -> str:
        return render_segmenter(self)


def render_segmenter(cfg: SegmenterConfig) -> str:
    """The head model: one encoded image (and clicks, as a request parameter) in, per-class maps out.

    No batching: images of one batch would give grids of different sizes.
    """
    outputs = [
        ("PROBS", "TYPE_FP32", "1, -1, -1, -1"),
        ("IMAGE_SIZE", "TYPE_INT32", "1, 2"),
        ("MODEL_INFO", "TYPE_STRING", "1, 1"),
    ]
    return (
        f'name: "{cfg.name}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensors("input", [("IMAGE", "TYPE_STRING", "1, 1")])
        + _tensors("output", outputs)
        + _head_tail(
            "segmenter",
            cfg.backbone,
            cfg.classes,
            cfg.instance_count,
            intra_op_threads=cfg.intra_op_threads,
            feature_cache_mb=cfg.feature_cache_mb,
        )
    )


def _batching_plain(max_batch_size: int) -> str:
    return f"max_batch_size: {max_batch_size}\ndynamic_batching {{ max_queue_delay_microseconds: 0 }}\n"
