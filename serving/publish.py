"""Publish weights as a new model version, and wire settings into serving objects.

Shared by ``labelloop export``, the trainer's publish step and the tests: export to ONNX, write
version N+1 atomically, then (when Triton is up) activate it with a real inference.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from labelloop.settings import Settings
from serving.client import DetectorClient, ModelInfo
from serving.control import activate_version
from serving.pbtxt import DetectorConfig
from serving.repository import ModelCard, ModelRepository

__all__ = ["detector_config", "make_client", "publish_weights"]

logger = logging.getLogger(__name__)


def make_client(settings: Settings) -> DetectorClient:
    return DetectorClient(
        settings.triton_url,
        settings.model_name,
        timeout_s=settings.triton_timeout_s,
        concurrency=settings.triton_concurrency,
        retries=settings.triton_retries,
    )


def detector_config(settings: Settings) -> DetectorConfig:
    """The Triton config the settings ask for."""
    return DetectorConfig(
        name=settings.model_name,
        max_batch_size=settings.max_batch_size,
        batch_delay_us=settings.batch_delay_us,
        instance_count=settings.instance_count,
        intra_op_threads=settings.ort_threads,
        score_threshold=settings.conf,
        iou_threshold=settings.iou,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        imgsz=settings.imgsz,
    )


def publish_weights(
    settings: Settings, weights: Path, card: ModelCard, activate: bool | None = None
) -> tuple[int, ModelInfo | None]:
    """Export ``weights`` and write them as the next version; load it when Triton is up.

    ``activate`` None means "if Triton is reachable". Returns the version and what is served.
    """
    from serving.export import export_onnx

    repo = ModelRepository(settings.model_repository)
    repo.write_config(detector_config(settings))
    with tempfile.TemporaryDirectory(prefix="labelloop-publish-") as tmp:
        result = export_onnx(weights, Path(tmp) / "model.onnx", card.imgsz, settings.state_dir)
        card.classes = list(result.meta.names)
        card.parent_version = card.parent_version or repo.latest(settings.model_name)
        version = repo.add_version(card, result.onnx, weights)
    return version, asyncio.run(_activate(settings, repo, version, activate))


async def _activate(settings: Settings, repo: ModelRepository, version: int, activate: bool | None) -> ModelInfo | None:
    if activate is False:
        return None
    async with make_client(settings) as client:
        if activate is None and not await client.is_live():
            logger.info("Triton at %s is not running; version %d is served at next start", client.url, version)
            return None
        return await activate_version(client, repo, version)
