"""Publish weights as a new model version, and wire settings into serving objects.

Shared by ``labelloop export``, the trainer's publish step and the tests: export to ONNX (and
quantize to INT8 when the settings ask), write version N+1 atomically, then (when Triton is up)
activate it with a real inference.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError, QuantizationError
from core.settings import Precision, Settings
from serving.client import ModelInfo, make_client
from serving.control import activate_version
from serving.pbtxt import DetectorConfig
from serving.repository import ModelCard, ModelRepository

if TYPE_CHECKING:  # the bridge imports this module; it needs no OpenCV
    from serving.triton.detector_ops import DetectorMeta

__all__ = [
    "BuiltModel",
    "build_model",
    "detector_config",
    "precision_summary",
    "publish_built",
    "publish_weights",
]

logger = logging.getLogger(__name__)


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
        rect=settings.rect,
        fast_jpeg_decode=settings.fast_jpeg_decode,
    )


@dataclass(frozen=True)
class BuiltModel:
    """The ONNX a version will serve, at the precision it ended up with, before it is published."""

    onnx: Path
    meta: DetectorMeta
    precision: Precision
    quantization: dict[str, Any] = field(default_factory=dict)


def build_model(settings: Settings, weights: Path, imgsz: int, folder: Path, images: Sequence[Path] = ()) -> BuiltModel:
    """Export ``weights`` into ``folder``; with ``precision: int8``, quantize on ``images`` too.

    An INT8 model that cannot be made or fails the agreement gate is not published: the FP32 one is,
    and the card says why (an automatic training loop must not stall on it).
    """
    from serving.export import export_onnx
    from serving.quantize import QuantizeOptions, quantize_int8, split_images

    calibration, check = split_images(images)
    if settings.precision == "int8" and not calibration:
        raise ConfigError(
            f"precision int8 needs images from the model's domain to calibrate on (no image files among the "
            f"{len(images)} given); pass some (labelloop export --calibration DIR) or set precision: fp32"
        )
    exported = export_onnx(weights, folder / "model.onnx", imgsz, settings.state_dir)
    if settings.precision == "fp32":
        return BuiltModel(exported.onnx, exported.meta, "fp32")
    options = QuantizeOptions(
        min_agreement=settings.int8_min_agreement,
        conf=settings.conf,
        iou=settings.iou,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        rect=settings.rect,
        fast_jpeg_decode=settings.fast_jpeg_decode,
    )
    try:
        result = quantize_int8(exported.onnx, folder / "model.int8.onnx", calibration, check, options)
    except QuantizationError as exc:
        logger.warning("publishing FP32 instead of INT8: %s", exc)
        return BuiltModel(exported.onnx, exported.meta, "fp32", {"refused": str(exc)})
    return BuiltModel(result.onnx, exported.meta, "int8", result.to_card())


def precision_summary(precision: str, quantization: dict[str, Any]) -> str:
    """One line for people: the precision published and, for INT8, the gate's verdict."""
    if precision == "int8":
        return f"int8 (agreement with fp32 {quantization['agreement']:.3f} on {quantization['check_images']} images)"
    if "refused" in quantization:
        return f"fp32 (int8 refused: {quantization['refused']})"
    return precision


def publish_built(
    settings: Settings, built: BuiltModel, weights: Path | None, card: ModelCard, activate: bool | None = None
) -> tuple[int, ModelInfo | None]:
    """Write ``built`` (and its source weights) as the next version; load it when Triton is up.

    ``activate`` None means "if Triton is reachable". Returns the version and what is served.
    """
    repo = ModelRepository(settings.model_repository)
    repo.write_config(detector_config(settings))
    card.classes = list(built.meta.names)
    card.precision = built.precision
    card.quantization = dict(built.quantization)
    card.parent_version = card.parent_version or repo.latest(settings.model_name)
    version = repo.add_version(card, built.onnx, weights)
    return version, asyncio.run(_activate(settings, repo, version, activate))


def publish_weights(
    settings: Settings,
    weights: Path,
    card: ModelCard,
    activate: bool | None = None,
    images: Sequence[Path] = (),
) -> tuple[int, ModelInfo | None]:
    """Build the ONNX for ``weights`` (``build_model``) and publish it (``publish_built``)."""
    with tempfile.TemporaryDirectory(prefix="labelloop-publish-") as tmp:
        built = build_model(settings, weights, card.imgsz, Path(tmp), images)
        return publish_built(settings, built, weights, card, activate)


async def _activate(settings: Settings, repo: ModelRepository, version: int, activate: bool | None) -> ModelInfo | None:
    if activate is False:
        return None
    async with make_client(settings) as client:
        if activate is None and not await client.is_live():
            logger.info("Triton at %s is not running; version %d is served at next start", client.url, version)
            return None
        return await activate_version(client, repo, version)
