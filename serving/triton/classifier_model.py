"""Triton python-backend model of a classifier head: an encoded image in, class probabilities out.

Copied as ``model.py`` into every classifier version, beside ``model.onnx`` (the head) and
``card.json``. One request from the bridge is one call: the image goes on to the backbone model by
BLS (Triton's business-logic scripting, inside the server), its fp16 patch tokens come back, and
the head's ONNX turns them into probabilities here. The head runs on the backbone version it was
trained on; a request finds any other served version refused with that reason.

IMAGE TYPE_STRING [B,1] -> PROBS FP32 [B,K] (softmax over the card's classes, in their order) and
MODEL_INFO TYPE_STRING [B,1] (JSON: name, version, kind, classes, backbone and its version, long
side, note). An image the backbone cannot decode fails only its own request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(config: dict, key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _error(message: str, code: object = None) -> object:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        card = json.loads((version_dir / "card.json").read_text())
        self.backbone = str(card["backbone"])
        self.backbone_version = int(card["backbone_version"])
        self.long_side = int(card["imgsz"])
        self.classes = list(card["classes"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_param(config, "intra_op_threads", "0")) or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        onnx_path = version_dir / "model.onnx"
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure must fail the version, with its reason
            raise pb_utils.TritonModelException(f"cannot load {onnx_path}: {exc}") from exc
        self.info = json.dumps(
            {
                "name": card["name"],
                "version": int(args["model_version"]),
                "kind": card.get("kind", "classifier"),
                "names": self.classes,
                "imgsz": [self.long_side],
                "backbone": self.backbone,
                "backbone_version": self.backbone_version,
                "note": card.get("note", ""),
                "provider": "CPUExecutionProvider",
            }
        ).encode()

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _tokens(self, blob: object) -> object:
        """The backbone's tokens for one image (BLS), or an error response."""
        image = pb_utils.Tensor("IMAGE", np.array([[blob]], dtype=np.object_))
        side = pb_utils.Tensor("LONG_SIDE", np.array([[self.long_side]], np.int32))
        reply = pb_utils.InferenceRequest(
            model_name=self.backbone, inputs=[image, side], requested_output_names=["TOKENS", "MODEL_INFO"]
        ).exec()
        if reply.has_error():
            message = reply.error().message()
            unknown = "unknown model" in message.lower() or "not ready" in message.lower()
            code = pb_utils.TritonError.UNAVAILABLE if unknown else pb_utils.TritonError.INVALID_ARG
            return _error(f"backbone {self.backbone}: {message}", code)
        served = json.loads(pb_utils.get_output_tensor_by_name(reply, "MODEL_INFO").as_numpy().reshape(-1)[0])
        if int(served["version"]) != self.backbone_version:
            return _error(
                f"this head was trained on {self.backbone} v{self.backbone_version}, Triton serves "
                f"v{served['version']}: train the head again",
                pb_utils.TritonError.UNAVAILABLE,
            )
        return pb_utils.get_output_tensor_by_name(reply, "TOKENS").as_numpy()

    def _one(self, request) -> object:
        blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        probs = []
        for blob in blobs:
            tokens = self._tokens(blob)
            if not isinstance(tokens, np.ndarray):
                return tokens
            probs.append(self.session.run(None, {"tokens": tokens.astype(np.float32)})[0][0])
        values = {
            "PROBS": np.stack(probs).astype(np.float32),
            "MODEL_INFO": np.array([[self.info]] * len(probs), dtype=np.object_),
        }
        wanted = set(request.requested_output_names()) or set(values)
        tensors = [pb_utils.Tensor(n, v) for n, v in values.items() if n in wanted]
        return pb_utils.InferenceResponse(output_tensors=tensors)
