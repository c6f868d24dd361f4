"""Heads on the backbone on the serving side: publishing a classifier, its client, and finding served heads.

A head's Triton model answers one call per image (``serving/triton/classifier_model.py`` reaches the
backbone by BLS). Its ``config.pbtxt`` carries ``labelloop_kind`` and ``backbone`` parameters, so
the bridge finds the heads Triton serves from the repository index and the configs alone, without
an inference per model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from core.errors import RepositoryError, TritonUnavailableError
from serving.client import DetectorClient, ModelInfo, probe_image
from serving.pbtxt import ClassifierConfig, render_classifier
from serving.repository import ModelCard, ModelRepository

__all__ = ["ClassifierClient", "ImageClasses", "ServedHead", "publish_classifier", "served_heads"]

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

    async def info(self) -> ModelInfo:
        """The served version and its classes, proven by a real inference (backbone included)."""
        return (await self.classify(probe_image())).model


def publish_classifier(
    repo: ModelRepository, card: ModelCard, onnx: Path, config: ClassifierConfig, weights: Path | None = None
) -> int:
    """Write the head's ``config.pbtxt``, ONNX and checkpoint as the next version (atomically); returns the version."""
    existing = repo.latest(card.name)
    if existing is not None and repo.kind(card.name) != card.kind:
        raise RepositoryError(f"{card.name!r} in {repo.root} is a {repo.kind(card.name)}; pick another session name")
    repo.write_config_text(card.name, render_classifier(config))
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
