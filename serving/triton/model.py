"""Triton python-backend model: encoded images in, detections in original pixels out.

One file, four roles, chosen by the config parameter ``stage``:

``full`` (the default runtime): everything in one model. With the ``rect`` parameter and an ONNX of
    dynamic height/width, each image is letterboxed to its own minimum stride-multiple rectangle, as
    ultralytics' predictor does; images of one shape run through onnxruntime together.
    IMAGE TYPE_STRING [B,1] -> DETECTIONS FP32 [B,N,6] (x1,y1,x2,y2,score,class_id; padded to the
    request's largest N), NUM_DETECTIONS INT32 [B,1], IMAGE_SIZE INT32 [B,2] (width, height after
    EXIF), MODEL_INFO TYPE_STRING [B,1] (JSON names/imgsz/version; sent only when requested),
    STAGE_MS FP32 [B,4] (this image's decode, preprocess, infer and NMS milliseconds, timed here; a
    run's time is shared evenly among its images; only when requested, for ``labelloop bench``).
``preprocess`` / ``infer`` / ``postprocess``: the steps of the ensemble variant. On NVIDIA's
    container ``infer`` is replaced by the ONNX on the ``onnxruntime_onnx`` backend.

Request parameters ``score_threshold`` and ``iou_threshold`` override the config defaults.
Images from all requests of a dynamic batch run through onnxruntime together (per network shape);
a request with an image that cannot be decoded or a parameter that is not valid fails alone: the
other requests of its batch are answered.

JPEGs are decoded in full (the pixels the trainer and ultralytics see) unless the config parameter
``fast_jpeg_decode`` is ``true``: then large ones are decoded at a reduced DCT scale (faster; scores
move a little, see ``labelloop bench``).

Threads on a CPU: a batch that runs while no other instance of this server executes uses
``intra_op_threads`` (all cores: lowest latency for a lone request); while other instances execute,
each uses one thread, so instances run side by side instead of fighting over cores (the best
throughput). See docs/performance.md for the measurements.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from detector_ops import (
    Letterbox,
    letterbox,
    letterbox_stride,
    network_input,
    parse_onnx_metadata,
    postprocess,
)
from image_decode import ImageRejected, decode_image

DETECTOR_OUTPUTS = ("DETECTIONS", "NUM_DETECTIONS", "IMAGE_SIZE", "MODEL_INFO", "STAGE_MS")
# Sent only to a client that asks for them by name.
ON_REQUEST = frozenset({"MODEL_INFO", "STAGE_MS"})


def _param(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _session_options(ort: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Pool threads spin-wait for work between operators: fast, but a spin that outlasts the gap
    # burns a core the bridge, Triton's gRPC threads or other processes need. 100 us keeps the
    # spinning latency and the CPU time of no spinning (measured: docs/performance.md).
    options.add_session_config_entry("session.intra_op.spin_duration_us", "100")
    return options


class RequestRejected(ValueError):
    """A request parameter is not valid (maps to an error for that request only)."""


def _threshold(params: dict, key: str, default: float) -> float:
    """A request's threshold parameter as a float, or the config's default when it sends none."""
    value = params.get(key, default)
    # Triton sends typed parameters (string, int, bool, double); a bool is no threshold.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestRejected(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise RequestRejected(f"{key} must be a number, got {value!r}") from None


def _error(message: str) -> object:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class _CoreGate:
    """Whether this instance executes alone among the python models of its tritonserver.

    Every stub of one server (its parent process) shares a lock file: an executing instance holds
    it shared, so an exclusive try succeeds only when no other instance is executing.
    """

    def __init__(self) -> None:
        path = Path(tempfile.gettempdir()) / f"labelloop-cores-{os.getppid()}.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def executing(self) -> Iterator[bool]:
        """Marks this instance busy for the block; yields True when it is the only one."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield alone
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.stage = _param(config, "stage", "full")
        self.version = int(args["model_version"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.max_bytes = int(_param(config, "max_image_bytes", "50000000"))
        self.max_pixels = int(_param(config, "max_image_pixels", "60000000"))
        self.conf = float(_param(config, "score_threshold", "0.25"))
        self.iou = float(_param(config, "iou_threshold", "0.7"))
        self.max_det = int(_param(config, "max_det", "300"))
        self.fast_jpeg = _param(config, "fast_jpeg_decode", "false") == "true"
        self.provider = "n/a"
        self.stride: int | None = None
        if self.stage in ("full", "infer"):
            self._load_onnx(config, args, version_dir / _param(config, "onnx_file", "model.onnx"))
        else:
            card = json.loads((version_dir / "card.json").read_text())
            self.names, self.imgsz = tuple(card["classes"]), (int(card["imgsz"]), int(card["imgsz"]))
        self.info = json.dumps(
            {"names": list(self.names), "imgsz": list(self.imgsz), "version": self.version, "provider": self.provider}
        ).encode()

    def _load_onnx(self, config: dict, args: dict, onnx_path: Path) -> None:
        import onnxruntime as ort

        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{onnx_path} is missing")
        threads = int(_param(config, "intra_op_threads", "0")) or os.cpu_count() or 1
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), _session_options(ort, threads), providers=providers)
            # The one-thread session for batches that run beside other instances (CPU only).
            self.lane = None
            instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
            if threads > 1 and instances > 1 and providers == ["CPUExecutionProvider"]:
                self.lane = ort.InferenceSession(str(onnx_path), _session_options(ort, 1), providers=providers)
            meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
        except Exception as exc:  # noqa: BLE001 - any load failure must fail the version, with its reason
            raise pb_utils.TritonModelException(f"cannot load {onnx_path}: {exc}") from exc
        self.names, self.imgsz = meta.names, meta.imgsz
        self.provider = self.session.get_providers()[0]
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.dynamic_batch = not isinstance(model_input.shape[0], int)
        if self.stage == "full":
            self.stride = letterbox_stride(model_input.shape, meta, _param(config, "rect", "true") == "true")
        self.gate = _CoreGate() if self.lane is not None else None
        # The first run allocates and optimises: do it before READY, not on a user's request.
        warm = np.zeros((1, 3, *self.imgsz), np.float32)
        self._infer(warm, alone=True)
        self._infer(warm, alone=False)

    def _infer(self, batch: np.ndarray, alone: bool = True) -> np.ndarray:
        session = self.session if alone or self.lane is None else self.lane
        if self.dynamic_batch:
            return session.run(None, {self.input_name: batch})[0]
        return np.concatenate([session.run(None, {self.input_name: b[None]})[0] for b in batch])

    def finalize(self) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close()

    def execute(self, requests: list) -> list:
        if self.stage == "full":
            return self._execute_full(requests)
        handler = {"preprocess": self._preprocess, "infer": self._infer_stage, "postprocess": self._postprocess}
        responses = []
        for request in requests:
            try:
                responses.append(handler[self.stage](request))
            except (ImageRejected, RequestRejected) as exc:
                responses.append(_error(str(exc)))
        return responses

    def _thresholds(self, request) -> tuple[float, float]:
        """The request's score and IoU thresholds, checked: a bad one rejects this request only."""
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError as exc:
            raise RequestRejected(f"request parameters are not JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise RequestRejected("request parameters are not a mapping")
        conf = _threshold(params, "score_threshold", self.conf)
        iou = _threshold(params, "iou_threshold", self.iou)
        # ``not (a <= x <= b)`` also refuses NaN.
        if not (0.0 <= conf <= 1.0):
            raise RequestRejected(f"score_threshold {conf} out of range [0, 1]")
        if not (0.0 < iou <= 1.0):
            raise RequestRejected(f"iou_threshold {iou} out of range (0, 1]")
        return conf, iou

    def _decode(self, request) -> tuple[list[np.ndarray], list[Letterbox], np.ndarray]:
        """All images of one request, letterboxed (uint8 HWC), with each image's decode and letterbox
        seconds (STAGE_MS)."""
        blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        pixels, boxes = [], []
        clock = np.zeros((len(blobs), 2))
        for k, blob in enumerate(blobs):
            started = time.perf_counter()
            try:
                target = self.imgsz if self.fast_jpeg else None
                img = decode_image(bytes(blob), self.max_bytes, self.max_pixels, target=target)
            except ImageRejected as exc:
                raise ImageRejected(f"image {k}: {exc}" if len(blobs) > 1 else str(exc)) from exc
            decoded = time.perf_counter()
            padded, box = letterbox(img.pixels, self.imgsz, orig=(img.width, img.height), stride=self.stride)
            clock[k] = decoded - started, time.perf_counter() - decoded
            pixels.append(padded)
            boxes.append(box)
        return pixels, boxes, clock

    def _run(self, pixels: list[np.ndarray], alone: bool) -> tuple[list[np.ndarray], np.ndarray]:
        """Network outputs of letterboxed images, one onnxruntime run per shape, with each image's
        share of the float conversion and of the run, in seconds."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(pixels):
            groups.setdefault(image.shape, []).append(k)
        outputs: list = [None] * len(pixels)
        clock = np.zeros((len(pixels), 2))
        for members in groups.values():
            started = time.perf_counter()
            batch = network_input([pixels[k] for k in members])
            converted = time.perf_counter()
            raw = self._infer(batch, alone)
            clock[members] = np.array([converted - started, time.perf_counter() - converted]) / len(members)
            for row, k in enumerate(members):
                outputs[k] = raw[row]
        return outputs, clock

    def _execute_full(self, requests: list) -> list:
        if self.gate is None:
            return self._execute_batch(requests, alone=True)
        with self.gate.executing() as alone:
            return self._execute_batch(requests, alone)

    def _execute_batch(self, requests: list, alone: bool) -> list:
        prepared: list = []
        for request in requests:
            try:
                thresholds = self._thresholds(request)  # before the decode: a bad request costs nothing
                prepared.append((*self._decode(request), *thresholds))
            except (ImageRejected, RequestRejected) as exc:
                prepared.append(exc)
        pixels = [image for item in prepared if not isinstance(item, Exception) for image in item[0]]
        raw, run_clock = self._run(pixels, alone) if pixels else ([], np.zeros((0, 2)))
        responses, offset = [], 0
        for request, item in zip(requests, prepared, strict=True):
            if isinstance(item, Exception):
                responses.append(_error(str(item)))
                continue
            _, boxes, clock, conf, iou = item
            dets, nms_s = [], []
            for k, box in enumerate(boxes):
                started = time.perf_counter()
                dets.append(postprocess(raw[offset + k], box, conf, iou, self.max_det))
                nms_s.append(time.perf_counter() - started)
            ran = run_clock[offset : offset + len(boxes)]
            offset += len(boxes)
            stages = np.column_stack([clock[:, 0], clock[:, 1] + ran[:, 0], ran[:, 1], nms_s]) * 1e3
            responses.append(self._detections(request, dets, boxes, stages))
        return responses

    def _detections(
        self, request, dets: list[np.ndarray], boxes: list[Letterbox], stages: np.ndarray | None = None
    ) -> object:
        n_max = max((len(d) for d in dets), default=0)
        out = np.zeros((len(dets), n_max, 6), np.float32)
        for k, d in enumerate(dets):
            out[k, : len(d)] = d
        values = {
            "DETECTIONS": out,
            "NUM_DETECTIONS": np.array([[len(d)] for d in dets], np.int32),
            "IMAGE_SIZE": np.array([[b.orig_w, b.orig_h] for b in boxes], np.int32),
            "MODEL_INFO": np.array([[self.info]] * len(dets), dtype=np.object_),
        }
        if stages is not None:
            values["STAGE_MS"] = stages.astype(np.float32)
        wanted = set(request.requested_output_names()) or set(DETECTOR_OUTPUTS) - ON_REQUEST
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, values[n]) for n in DETECTOR_OUTPUTS if n in wanted and n in values]
        )

    def _preprocess(self, request) -> object:
        pixels, boxes, _ = self._decode(request)
        batch = network_input(pixels)
        meta = np.array([[b.orig_w, b.orig_h, b.new_w, b.new_h, b.left, b.top] for b in boxes], np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("PIXELS", batch), pb_utils.Tensor("LETTERBOX", meta)]
        )

    def _infer_stage(self, request) -> object:
        batch = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output0", self._infer(batch))])

    def _postprocess(self, request) -> object:
        raw = pb_utils.get_input_tensor_by_name(request, "PREDICTIONS").as_numpy()
        meta = pb_utils.get_input_tensor_by_name(request, "LETTERBOX").as_numpy()
        conf, iou = self._thresholds(request)
        boxes = [Letterbox(*map(int, row)) for row in meta]
        dets = [postprocess(raw[k], box, conf, iou, self.max_det) for k, box in enumerate(boxes)]
        return self._detections(request, dets, boxes)
