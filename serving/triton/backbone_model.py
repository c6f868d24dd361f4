"""Triton python-backend model of a backbone: an encoded image in, its patch-token grid out.

Copied as ``model.py`` into every backbone version, beside ``features_ops.py``, ``image_decode.py``,
``model.onnx`` and ``card.json``. The pytriton tritonserver has only the python backend, so the ONNX
runs here through onnxruntime.

IMAGE TYPE_STRING [B,1] and optional LONG_SIDE INT32 [B,1] (else the request parameter ``long_side``,
else the config's) -> TOKENS FP16 [B,h,w,C] (last-layer patch tokens after the final norm; cls and
register tokens dropped), GRID INT32 [B,2] (h, w), SIZE INT32 [B,2] (resized width, height),
IMAGE_SIZE INT32 [B,2] (width, height after EXIF) and MODEL_INFO TYPE_STRING [B,1] (JSON: name,
version, kind, arch, patch size, note; sent only when asked for). The images of one request must
resize to one grid; an image that cannot be decoded fails only its own request. Images of all the
requests of a dynamic batch that resize to one grid run through onnxruntime together.

Threads on a CPU, as in the detector's ``model.py`` ("two lanes"): an onnxruntime run that starts
while no other instance of this tritonserver executes uses ``intra_op_threads`` (all cores: the
lowest latency for a lone request); while another instance executes, it uses a one-thread session,
so one instance's decode and resize overlap the other's network run instead of the two fighting
over the cores. See docs/performance.md for the measurements.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from features_ops import network_input, resize_for_backbone
from image_decode import ImageRejected, decode_image

OUTPUTS = ("TOKENS", "GRID", "SIZE", "IMAGE_SIZE", "MODEL_INFO")
ON_REQUEST = frozenset({"MODEL_INFO"})


def _param(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _error(message: str) -> object:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


def _session_options(ort: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads spin-wait for the next operator; a spin that outlasts the gap burns a core
    # the other instance's decode or tritonserver needs (the detector's measurements).
    options.add_session_config_entry("session.intra_op.spin_duration_us", "100")
    return options


class _CoreGate:
    """Whether this instance runs alone among the python models of its tritonserver.

    The same lock file as the detector's ``model.py`` (one per server: its parent process), so
    backbone and detector instances of one server see each other: an executing instance holds it
    shared, and an exclusive try succeeds only when no other instance is executing.
    """

    def __init__(self) -> None:
        path = Path(tempfile.gettempdir()) / f"labelloop-cores-{os.getppid()}.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextmanager
    def executing(self) -> Iterator[None]:
        """Marks this instance busy for the block."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def alone(self) -> bool:
        """Inside ``executing``: whether no other instance executes now (this one stays marked busy)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        return alone

    def close(self) -> None:
        os.close(self._fd)


class _Prepared:
    """One request's resized images, their sizes after EXIF, and (after the run) their fp16 tokens."""

    def __init__(self, resized: list[np.ndarray], sizes: list[tuple[int, int]]) -> None:
        self.resized = resized
        self.sizes = sizes
        self.tokens: list[np.ndarray] = []


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.max_bytes = int(_param(config, "max_image_bytes", "50000000"))
        self.max_pixels = int(_param(config, "max_image_pixels", "60000000"))
        self.long_side = int(_param(config, "long_side", "448"))
        self.max_long_side = int(_param(config, "max_long_side", "2048"))
        card = json.loads((version_dir / "card.json").read_text())
        self.patch = int(card["patch_size"])
        self.mean, self.std = card["image_mean"], card["image_std"]
        onnx_path = version_dir / "model.onnx"
        threads = int(_param(config, "intra_op_threads", "0")) or os.cpu_count() or 1
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), _session_options(ort, threads), providers=providers)
            # The one-thread session for runs beside other instances (CPU, several instances only).
            self.lane = None
            instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
            if threads > 1 and instances > 1 and providers == ["CPUExecutionProvider"]:
                self.lane = ort.InferenceSession(str(onnx_path), _session_options(ort, 1), providers=providers)
        except Exception as exc:  # noqa: BLE001 - any load failure must fail the version, with its reason
            raise pb_utils.TritonModelException(f"cannot load {onnx_path}: {exc}") from exc
        self.gate = _CoreGate() if self.lane is not None else None
        self.input_name = self.session.get_inputs()[0].name
        self.info = json.dumps(
            {
                "name": card["name"],
                "version": int(args["model_version"]),
                "kind": card.get("kind", "backbone"),
                "arch": card.get("arch"),
                "patch_size": self.patch,
                "hidden_size": card.get("hidden_size"),
                "note": card.get("note", ""),
                "provider": self.session.get_providers()[0],
            }
        ).encode()
        # The first run allocates and optimises: do it before READY, not on a user's request.
        warm = {self.input_name: np.zeros((1, 3, self.patch * 2, self.patch * 2), np.float32)}
        for session in (self.session, self.lane):
            if session is not None:
                session.run(None, warm)

    def finalize(self) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close()

    def execute(self, requests: list) -> list:
        if self.gate is None:
            return self._execute(requests)
        with self.gate.executing():
            return self._execute(requests)

    def _execute(self, requests: list) -> list:
        prepared: list[_Prepared | ImageRejected] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request))
            except ImageRejected as exc:
                prepared.append(exc)
        # One onnxruntime run per grid, over the images of every request of the batch.
        groups: dict[tuple[int, ...], list[tuple[_Prepared, np.ndarray]]] = {}
        for item in prepared:
            if isinstance(item, _Prepared):
                for image in item.resized:
                    groups.setdefault(image.shape, []).append((item, image))
        for members in groups.values():
            tokens = self._run(network_input([image for _, image in members], self.mean, self.std))
            for (item, _), row in zip(members, tokens.astype(np.float16), strict=True):
                item.tokens.append(row)
        return [
            _error(str(item)) if isinstance(item, ImageRejected) else self._response(request, item)
            for request, item in zip(requests, prepared, strict=True)
        ]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        # Decided at the run, not at the start of the batch: the other instance may have started or
        # finished while this one decoded.
        session = self.session
        if self.lane is not None and self.gate is not None and not self.gate.alone():
            session = self.lane
        tokens: np.ndarray = session.run(None, {self.input_name: batch})[0]
        return tokens

    def _long_side(self, request, count: int) -> list[int]:
        tensor = pb_utils.get_input_tensor_by_name(request, "LONG_SIDE")
        if tensor is not None:
            sides = [int(v) for v in tensor.as_numpy().reshape(-1)]
        else:
            params = json.loads(request.parameters() or "{}")
            sides = [int(params.get("long_side", self.long_side))] * count
        for side in sides:
            if not self.patch <= side <= self.max_long_side:
                raise ImageRejected(f"long side {side} out of range [{self.patch}, {self.max_long_side}]")
        return sides

    def _prepare(self, request) -> _Prepared:
        blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        if not len(blobs):
            raise ImageRejected("the request holds no image")
        sides = self._long_side(request, len(blobs))
        resized, sizes = [], []
        for k, (blob, side) in enumerate(zip(blobs, sides, strict=True)):
            try:
                img = decode_image(bytes(blob), self.max_bytes, self.max_pixels)
            except ImageRejected as exc:
                raise ImageRejected(f"image {k}: {exc}" if len(blobs) > 1 else str(exc)) from exc
            resized.append(resize_for_backbone(img.pixels, side, self.patch))
            sizes.append((img.width, img.height))
        shapes = {r.shape for r in resized}
        if len(shapes) > 1:
            raise ImageRejected(f"the images of one request resize to different grids {sorted(shapes)}")
        return _Prepared(resized, sizes)

    def _response(self, request, item: _Prepared) -> object:
        height, width = item.resized[0].shape[:2]
        count = len(item.resized)
        values = {
            "TOKENS": item.tokens[0][None] if count == 1 else np.stack(item.tokens),
            "GRID": np.array([[height // self.patch, width // self.patch]] * count, np.int32),
            "SIZE": np.array([[width, height]] * count, np.int32),
            "IMAGE_SIZE": np.array(item.sizes, np.int32),
            "MODEL_INFO": np.array([[self.info]] * count, dtype=np.object_),
        }
        wanted = set(request.requested_output_names()) or set(OUTPUTS) - ON_REQUEST
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, values[n]) for n in OUTPUTS if n in wanted]
        )
