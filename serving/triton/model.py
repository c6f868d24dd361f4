"""Triton python-backend model: encoded images in, detections in original pixels out.

Inputs : IMAGE            TYPE_STRING [B, 1]  encoded JPEG/PNG/BMP/TIFF/WebP bytes
Outputs: DETECTIONS       TYPE_FP32   [B, N, 6]  x1, y1, x2, y2, score, class_id (padded to the request's max N)
         NUM_DETECTIONS   TYPE_INT32  [B, 1]
         IMAGE_SIZE       TYPE_INT32  [B, 2]  width, height in display orientation
         MODEL_INFO       TYPE_STRING [B, 1]  JSON {"names", "imgsz", "version", "provider"}; only when requested
Request parameters: ``score_threshold`` and ``iou_threshold`` (defaults from config parameters).

Images from all requests of a dynamic batch run through onnxruntime together; an image that
cannot be decoded fails only its own request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from detector_ops import ImageRejected, decode_image, letterbox, parse_onnx_metadata, postprocess

OUTPUTS = ("DETECTIONS", "NUM_DETECTIONS", "IMAGE_SIZE", "MODEL_INFO")


def _param(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / _param(config, "onnx_file", "model.onnx")
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{onnx_path} is missing")

        options = ort.SessionOptions()
        threads = int(_param(config, "intra_op_threads", "0")) or os.cpu_count() or 1
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
            self.meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
        except Exception as exc:  # noqa: BLE001 - any load failure must fail the version, with its reason
            raise pb_utils.TritonModelException(f"cannot load {onnx_path}: {exc}") from exc

        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.dynamic_batch = not isinstance(model_input.shape[0], int)
        self.max_bytes = int(_param(config, "max_image_bytes", "50000000"))
        self.max_pixels = int(_param(config, "max_image_pixels", "60000000"))
        self.conf = float(_param(config, "score_threshold", "0.25"))
        self.iou = float(_param(config, "iou_threshold", "0.7"))
        self.max_det = int(_param(config, "max_det", "300"))
        self.info = json.dumps(
            {
                "names": list(self.meta.names),
                "imgsz": list(self.meta.imgsz),
                "version": int(args["model_version"]),
                "provider": self.session.get_providers()[0],
            }
        ).encode()
        # First run allocates and optimises; do it before READY, not on a user's request.
        self._infer([np.zeros((*self.meta.imgsz, 3), np.uint8)])

    def _infer(self, images: list[np.ndarray]) -> np.ndarray:
        batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        if self.dynamic_batch:
            return self.session.run(None, {self.input_name: batch})[0]
        return np.concatenate([self.session.run(None, {self.input_name: b[None]})[0] for b in batch])

    def execute(self, requests: list) -> list:
        prepared: list = []
        for request in requests:
            try:
                prepared.append(self._prepare(request))
            except ImageRejected as exc:
                prepared.append(exc)
        tensors = [t for item in prepared if not isinstance(item, Exception) for t in item[0]]
        raw = self._infer(tensors) if tensors else None

        responses = []
        offset = 0
        for request, item in zip(requests, prepared, strict=True):
            if isinstance(item, Exception):
                error = pb_utils.TritonError(str(item), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            tensors_i, boxes, conf, iou = item
            dets = [
                postprocess(raw[offset + k], boxes[k], conf, iou, self.max_det) for k in range(len(tensors_i))
            ]
            offset += len(tensors_i)
            responses.append(self._response(request, dets, boxes))
        return responses

    def _prepare(self, request) -> tuple:
        data = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        params = json.loads(request.parameters() or "{}")
        conf = float(params.get("score_threshold", self.conf))
        iou = float(params.get("iou_threshold", self.iou))
        if not (0.0 <= conf <= 1.0 and 0.0 < iou <= 1.0):
            raise ImageRejected(f"score_threshold {conf} / iou_threshold {iou} out of range")
        tensors, boxes = [], []
        for k, blob in enumerate(data):
            try:
                img = decode_image(bytes(blob), self.max_bytes, self.max_pixels)
            except ImageRejected as exc:
                prefix = f"image {k}: " if len(data) > 1 else ""
                raise ImageRejected(f"{prefix}{exc}") from exc
            tensor, box = letterbox(img, self.meta.imgsz)
            tensors.append(tensor)
            boxes.append(box)
        return tensors, boxes, conf, iou

    def _response(self, request, dets: list[np.ndarray], boxes: list) -> object:
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
        wanted = set(request.requested_output_names()) or set(OUTPUTS) - {"MODEL_INFO"}
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, values[name]) for name in OUTPUTS if name in wanted]
        )
