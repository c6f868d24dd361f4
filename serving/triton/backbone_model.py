"""Triton python-backend model of a backbone: an encoded image in, its patch-token grid out.

Copied as ``model.py`` into every backbone version, beside ``features_ops.py``, ``image_decode.py``,
``model.onnx`` and ``card.json``. The pytriton tritonserver has only the python backend, so the ONNX
runs here through onnxruntime.

IMAGE TYPE_STRING [B,1] and optional LONG_SIDE INT32 [B,1] (else the request parameter ``long_side``,
else the config's) -> TOKENS FP16 [B,h,w,C] (last-layer patch tokens after the final norm; cls and
register tokens dropped), GRID INT32 [B,2] (h, w), SIZE INT32 [B,2] (resized width, height),
IMAGE_SIZE INT32 [B,2] (width, height after EXIF) and MODEL_INFO TYPE_STRING [B,1] (JSON: name,
version, kind, arch, patch size, note; sent only when asked for). The images of one request must
resize to one grid; an image that cannot be decoded fails only its own request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - any load failure must fail the version, with its reason
            raise pb_utils.TritonModelException(f"cannot load {onnx_path}: {exc}") from exc
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
        self.session.run(None, {self.input_name: np.zeros((1, 3, self.patch * 2, self.patch * 2), np.float32)})

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

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

    def _one(self, request) -> object:
        try:
            blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
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
        except ImageRejected as exc:
            return _error(str(exc))
        tokens = self.session.run(None, {self.input_name: network_input(resized, self.mean, self.std)})[0]
        height, width = resized[0].shape[:2]
        values = {
            "TOKENS": tokens.astype(np.float16),
            "GRID": np.array([[height // self.patch, width // self.patch]] * len(resized), np.int32),
            "SIZE": np.array([[width, height]] * len(resized), np.int32),
            "IMAGE_SIZE": np.array(sizes, np.int32),
            "MODEL_INFO": np.array([[self.info]] * len(resized), dtype=np.object_),
        }
        wanted = set(request.requested_output_names()) or set(OUTPUTS) - ON_REQUEST
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, values[n]) for n in OUTPUTS if n in wanted]
        )
