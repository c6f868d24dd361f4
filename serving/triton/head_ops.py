"""What every head's Triton model shares: its card, its ONNX session and the backbone reached by BLS.

Copied as ``head_ops.py`` into every head version beside ``model.py``. A head runs on the backbone
version it was trained on; a request that finds another version served is refused with that reason,
and an image the backbone cannot decode fails only its own request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class Refused(Exception):
    """One request cannot be answered; ``response`` is the error response that says why."""

    def __init__(self, message: str, code: object = None) -> None:
        super().__init__(message)
        self.response = error_response(message, code)


def param(config: dict, key: str, default: str) -> str:
    """A ``config.pbtxt`` string parameter."""
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def error_response(message: str, code: object = None) -> object:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class HeadModel:
    """A head version as loaded by Triton: card, ONNX session, the backbone it reads and the MODEL_INFO it sends."""

    def __init__(self, args: dict, default_kind: str) -> None:
        import onnxruntime as ort

        self.config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        card = json.loads((version_dir / "card.json").read_text())
        self.backbone = str(card["backbone"])
        self.backbone_version = int(card["backbone_version"])
        self.long_side = int(card["imgsz"])
        self.classes = list(card["classes"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(param(self.config, "intra_op_threads", "0")) or os.cpu_count() or 1
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
                "kind": card.get("kind", default_kind),
                "names": self.classes,
                "imgsz": [self.long_side],
                "backbone": self.backbone,
                "backbone_version": self.backbone_version,
                "note": card.get("note", ""),
                "provider": "CPUExecutionProvider",
            }
        ).encode()

    def run(self, tokens: np.ndarray) -> np.ndarray:
        """The head's ONNX on one token grid (h, w, C): its first output, batch dimension dropped."""
        return self.session.run(None, {"tokens": tokens[None].astype(np.float32)})[0][0]

    def backbone_features(self, blob: object) -> tuple[np.ndarray, tuple[int, int]]:
        """The backbone's tokens (h, w, C) for one image by BLS, with the image's (width, height).

        Raises :class:`Refused` when the backbone is missing, refuses the image or serves another version.
        """
        image = pb_utils.Tensor("IMAGE", np.array([[blob]], dtype=np.object_))
        side = pb_utils.Tensor("LONG_SIDE", np.array([[self.long_side]], np.int32))
        reply = pb_utils.InferenceRequest(
            model_name=self.backbone,
            inputs=[image, side],
            requested_output_names=["TOKENS", "IMAGE_SIZE", "MODEL_INFO"],
        ).exec()
        if reply.has_error():
            message = reply.error().message()
            unknown = "unknown model" in message.lower() or "not ready" in message.lower()
            code = pb_utils.TritonError.UNAVAILABLE if unknown else pb_utils.TritonError.INVALID_ARG
            raise Refused(f"backbone {self.backbone}: {message}", code)
        served = json.loads(pb_utils.get_output_tensor_by_name(reply, "MODEL_INFO").as_numpy().reshape(-1)[0])
        if int(served["version"]) != self.backbone_version:
            raise Refused(
                f"this head was trained on {self.backbone} v{self.backbone_version}, Triton serves "
                f"v{served['version']}: train the head again",
                pb_utils.TritonError.UNAVAILABLE,
            )
        tokens = pb_utils.get_output_tensor_by_name(reply, "TOKENS").as_numpy()[0]
        width, height = (int(v) for v in pb_utils.get_output_tensor_by_name(reply, "IMAGE_SIZE").as_numpy()[0])
        return tokens, (width, height)

    def respond(self, request: Any, values: dict[str, np.ndarray]) -> object:
        """The response with the outputs the request asked for (all of them when it named none)."""
        wanted = set(request.requested_output_names()) or set(values)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, v) for n, v in values.items() if n in wanted]
        )
