"""Triton python-backend model of a classifier head: an encoded image in, class probabilities out.

Copied as ``model.py`` into every classifier version, beside ``head_ops.py``, ``model.onnx`` (the
head) and ``card.json``. One request from the bridge is one call: the image goes on to the backbone
model by BLS (Triton's business-logic scripting, inside the server), its fp16 patch tokens come
back, and the head's ONNX turns them into probabilities here (``head_ops.HeadModel``).

IMAGE TYPE_STRING [B,1] -> PROBS FP32 [B,K] (softmax over the card's classes, in their order) and
MODEL_INFO TYPE_STRING [B,1] (JSON: name, version, kind, classes, backbone and its version, long
side, note). An image the backbone cannot decode fails only its own request.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils
from head_ops import HeadModel, Refused


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.head = HeadModel(args, "classifier")

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request) -> object:
        blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        probs = []
        try:
            for blob in blobs:
                tokens, _ = self.head.backbone_features(blob)
                probs.append(self.head.run(tokens))
        except Refused as exc:
            return exc.response
        return self.head.respond(
            request,
            {
                "PROBS": np.stack(probs).astype(np.float32),
                "MODEL_INFO": np.array([[self.head.info]] * len(probs), dtype=np.object_),
            },
        )
