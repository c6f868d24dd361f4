"""Heads on the backbone on the serving side: publishing a head, its clients, and finding served heads.

A head's Triton model answers one call per image (``serving/triton/head_ops.py`` reaches the
backbone by BLS). Its ``config.pbtxt`` carries ``labelloop_kind`` and ``backbone`` parameters, so
the bridge finds the heads Triton serves from the repository index and the configs alone, without
an inference per model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from core.errors import RepositoryError, TritonUnavailableError
from serving.client import DetectorClient, ModelInfo, probe_image
from serving.pbtxt import ClassifierConfig, SegmenterConfig
from serving.repository import ModelCard, ModelRepository

__all__ = [
    "ClassifierClient",
    "ImageClasses",
    "ImageMasks",
    "SegmenterClient",
    "ServedHead",
    "publish_head",
    "served_heads",
]

logger = logging.getLogger(__name__)

KIND_PARAMETER = "labelloop_kind"


@dataclass(frozen=True)
class ImageClasses:
    """One image's class probabilities (in ``model.classes`` order), with the version that produced them."""

    probs: npt.NDArray[np.float32]
    model: ModelInfo
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> tuple[str, float]:
        index = int(np.argmax(self.probs))
        return self.model.classes[index], float(self.probs[index])


class ClassifierClient(DetectorClient):
    """Talks to one served classifier head; loading, deadlines and retries as for a detector."""

    async def classify(self, image: bytes, deadline: float | None = None) -> ImageClasses:
        """Class probabilities of one encoded image (one request: a bad image fails alone)."""
        result, elapsed = await self.infer_image(image, ("PROBS", "MODEL_INFO"), deadline)
        model = self._model_info(result.as_numpy("MODEL_INFO")[0, 0])
        return ImageClasses(probs=result.as_numpy("PROBS")[0], model=model, stats={"round_trip_s": elapsed})

    async def predict_image(
        self, image: bytes, clicks: Sequence[tuple[float, float, int]] = (), deadline: float | None = None
    ) -> ImageClasses:
        """The head kinds' common call (``ls_bridge.heads``); a classifier takes no clicks."""
        return await self.classify(image, deadline)

    async def info(self) -> ModelInfo:
        """The served version and its classes, proven by a real inference (backbone included)."""
        return (await self.classify(probe_image())).model


@dataclass(frozen=True)
class ImageMasks:
    """One image's per-class probability maps on the patch grid (K, h, w), its size and the version that answered."""

    probs: npt.NDArray[np.float32]
    width: int
    height: int
    model: ModelInfo
    stats: dict[str, float] = field(default_factory=dict)


class SegmenterClient(DetectorClient):
    """Talks to one served segmenter head; ``clicks`` are a person's points, refined against on the server."""

    async def predict_image(
        self, image: bytes, clicks: Sequence[tuple[float, float, int]] = (), deadline: float | None = None
    ) -> ImageMasks:
        """Probability maps of one image; ``clicks`` are ``(x, y, class)`` as fractions of the image's width
        and height (0..1), class -1 for background."""
        parameters = {"clicks": json.dumps([[float(x), float(y), int(k)] for x, y, k in clicks])} if clicks else None
        result, elapsed = await self.infer_image(image, ("PROBS", "IMAGE_SIZE", "MODEL_INFO"), deadline, parameters)
        width, height = (int(v) for v in result.as_numpy("IMAGE_SIZE")[0])
        return ImageMasks(
            probs=result.as_numpy("PROBS")[0],
            width=width,
            height=height,
            model=self._model_info(result.as_numpy("MODEL_INFO")[0, 0]),
            stats={"round_trip_s": elapsed},
        )

    async def info(self) -> ModelInfo:
        """The served version and its classes, proven by a real inference (backbone included)."""
        return (await self.predict_image(probe_image())).model


def publish_head(
    repo: ModelRepository,
    card: ModelCard,
    onnx: Path,
    config: ClassifierConfig | SegmenterConfig,
    weights: Path | None = None,
) -> int:
    """Write the head's ``config.pbtxt``, ONNX and checkpoint as the next version (atomically); returns the version."""
    existing = repo.latest(card.name)
    if existing is not None and repo.kind(card.name) != card.kind:
        raise RepositoryError(f"{card.name!r} in {repo.root} is a {repo.kind(card.name)}; pick another session name")
    repo.write_config_text(card.name, config.render())
    return repo.add_version(card, onnx, weights)


@dataclass(frozen=True)
class ServedHead:
    """A head Triton serves, as its config says: the backbone it runs on and its classes."""

    backbone: str
    classes: tuple[str, ...]


def _param(params: dict[str, Any], key: str) -> str:
    return str(params.get(key, {}).get("string_value", ""))


async def served_heads(url: str, kind: str, timeout_s: float = 5.0) -> dict[str, ServedHead]:
    """The READY models of ``kind`` on the Triton at ``url``, by name (from the index and configs, no inference)."""
    client = grpcclient.InferenceServerClient(url=url)
    try:
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
        found: dict[str, ServedHead] = {}
        for name in sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"}):
            config = (await client.get_model_config(name, as_json=True, client_timeout=timeout_s)).get("config", {})
            params = config.get("parameters", {})
            if _param(params, KIND_PARAMETER) == kind:
                classes = json.loads(_param(params, "classes") or "[]")
                found[name] = ServedHead(_param(params, "backbone"), tuple(str(c) for c in classes))
        return found
    except InferenceServerException as exc:
        raise TritonUnavailableError(f"listing the models Triton serves at {url} failed: {exc.message()}") from exc
    finally:
        await client.close()
