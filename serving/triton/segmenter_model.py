"""Triton python-backend model of a segmenter head: an encoded image (and clicks) in, probability maps out.

Copied as ``model.py`` into every segmenter version, beside ``head_ops.py``, ``masks.py``,
``feature_cache.py``, ``model.onnx`` (the head) and ``card.json``. One request is one call: the
backbone's tokens come by BLS (``head_ops.HeadModel``), the head's ONNX turns them into one
probability map per class on the patch grid.

Interactive refinement: the request parameter ``clicks`` (JSON ``[[x, y, class], ...]``, fractions
of the image's width and height as Label Studio's percentages give them, class -1 for background)
adjusts the maps to the clicks (``masks.refine_with_clicks``).
The tokens of recent images are kept in memory (``feature_cache.MemoryFeatureCache``, keyed by the
image's content hash, the backbone version and the long side), so a person's clicks on one image
never run the backbone again.

IMAGE TYPE_STRING [1,1] -> PROBS FP32 [1,K,h,w] (sigmoid per class, the card's class order),
IMAGE_SIZE INT32 [1,2] (width, height after EXIF) and MODEL_INFO TYPE_STRING [1,1].
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from feature_cache import FeatureKey, MemoryFeatureCache
from head_ops import HeadModel, Refused, param
from masks import point_cell, refine_with_clicks


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.head = HeadModel(args, "segmenter")
        self.cache = MemoryFeatureCache(float(param(self.head.config, "feature_cache_mb", "256")))

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _features(self, blob: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        key = FeatureKey.for_image(blob, self.head.backbone, self.head.backbone_version, self.head.long_side)
        cached = self.cache.get_entry(key)
        if cached is not None:
            return cached
        tokens, size = self.head.backbone_features(blob)
        self.cache.put(key, tokens, size)
        return tokens, size

    def _clicks(self, request, size: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int, int]]:
        try:
            raw = json.loads(request.parameters() or "{}").get("clicks") or "[]"
            # Triton's request parameters are strings, ints or bools: the list travels as JSON text.
            raw = json.loads(raw) if isinstance(raw, str) else raw
            clicks = [(float(x), float(y), int(k)) for x, y, k in raw]
        except (ValueError, TypeError, AttributeError) as exc:
            raise Refused(f"request parameter clicks must be JSON [[x, y, class], ...]: {exc}") from exc
        count = len(self.head.classes)
        cells = []
        for x, y, k in clicks:
            if not (-1 <= k < count):
                raise Refused(f"click class {k} is not -1 (background) or a class index below {count}")
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise Refused(f"click ({x}, {y}) is outside the image: x and y are fractions of its size")
            row, col = point_cell(x * size[0], y * size[1], size[0], size[1], grid[0], grid[1])
            cells.append((row, col, k))
        return cells

    def _one(self, request) -> object:
        blobs = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        if len(blobs) != 1:
            return Refused(f"one image per request, got {len(blobs)}").response
        try:
            tokens, size = self._features(bytes(blobs[0]))
            probs = self.head.run(tokens)
            clicks = self._clicks(request, size, (int(tokens.shape[0]), int(tokens.shape[1])))
        except Refused as exc:
            return exc.response
        if clicks:
            probs = refine_with_clicks(tokens, probs, clicks)
        return self.head.respond(
            request,
            {
                "PROBS": np.asarray(probs, np.float32)[None],
                "IMAGE_SIZE": np.array([size], np.int32),
                "MODEL_INFO": np.array([[self.head.info]], dtype=np.object_),
            },
        )
