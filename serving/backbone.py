"""The backbone on the serving side: its card and Triton config, publishing, and a features client.

A backbone (``kind: "backbone"``) is a frozen feature extractor (DINOv3 ViT) served from Triton by
``serving/triton/backbone_model.py``: an encoded image in, its last-layer patch tokens out (fp16,
``(h, w, C)``). Heads of the other kinds train on and run over those tokens. This module has no
torch: the trainer exports the ONNX, this publishes it and reads features back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpcclient

from core.errors import ConfigError, LabelloopError, RepositoryError
from core.settings import Settings
from serving.client import DetectorClient, ModelInfo, probe_image
from serving.control import load_served_version
from serving.launcher import TritonProcess
from serving.pbtxt import BackboneConfig, render_backbone
from serving.repository import ModelCard, ModelRepository

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_LONG_SIDE",
    "DEMO_NOTE",
    "KIND",
    "BackboneInfo",
    "Features",
    "FeaturesClient",
    "backbone_card",
    "card_summary",
    "embed_files",
    "publish_backbone",
]

logger = logging.getLogger(__name__)

KIND = "backbone"
DEFAULT_BACKBONE = "dinov3"
# The practical CPU default (FIELD-NOTES §8: ViT-S/16 takes 0.32 s at 448², 15 s at 1536²).
DEFAULT_LONG_SIDE = 448
DEMO_NOTE = "random-init demo backbone"
TOKENS, GRID, SIZE, IMAGE_SIZE, MODEL_INFO = "TOKENS", "GRID", "SIZE", "IMAGE_SIZE", "MODEL_INFO"


@dataclass(frozen=True)
class BackboneInfo:
    """What a served backbone version says about itself."""

    name: str
    version: int
    arch: str | None
    patch_size: int
    hidden_size: int | None
    note: str
    provider: str


@dataclass(frozen=True)
class Features:
    """One image's patch tokens as served: ``tokens`` fp16 (h, w, C); ``size`` is the resized (width, height)."""

    tokens: npt.NDArray[np.float16]
    grid: tuple[int, int]
    size: tuple[int, int]
    image_size: tuple[int, int]
    model: BackboneInfo = field(repr=False)


def backbone_card(
    name: str,
    *,
    arch: str,
    patch_size: int,
    hidden_size: int,
    num_register_tokens: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    long_side: int = DEFAULT_LONG_SIDE,
    source_sha256: str | None = None,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """A backbone's model card (``version`` and hashes are filled in when it is published)."""
    return ModelCard(
        name=name,
        version=0,
        classes=[],
        imgsz=long_side,
        kind=KIND,
        arch=arch,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_register_tokens=num_register_tokens,
        image_mean=[float(v) for v in image_mean],
        image_std=[float(v) for v in image_std],
        source_weights_sha256=source_sha256,
        note=note,
        train_args=dict(extra or {}),
    )


def card_summary(card: ModelCard) -> dict[str, Any]:
    """The ``labelloop backbone import/demo --json`` document."""
    return {
        "name": card.name,
        "version": card.version,
        "kind": card.kind,
        "arch": card.arch,
        "patch_size": card.patch_size,
        "hidden_size": card.hidden_size,
        "num_register_tokens": card.num_register_tokens,
        "note": card.note,
        "source_sha256": card.source_weights_sha256,
    }


def publish_backbone(
    repo: ModelRepository,
    card: ModelCard,
    onnx: Path,
    config: BackboneConfig,
    extra_files: dict[str, Path] | None = None,
) -> int:
    """Write the backbone's ``config.pbtxt`` and its ONNX as the next version (atomically); returns the version."""
    if card.kind != KIND:
        raise RepositoryError(f"{card.name}: a {card.kind} card cannot be published as a backbone")
    existing = repo.latest(card.name)
    if existing is not None and repo.card(card.name, existing).kind != KIND:
        raise RepositoryError(f"{card.name!r} in {repo.root} is a {repo.card(card.name, existing).kind}; pick a name")
    repo.write_config_text(card.name, render_backbone(config))
    return repo.add_version(card, onnx, extra_files=extra_files)


def backbone_config(settings: Settings, name: str, long_side: int = DEFAULT_LONG_SIDE) -> BackboneConfig:
    """The Triton config of a backbone under these settings."""
    return BackboneConfig(
        name=name,
        max_batch_size=settings.max_batch_size,
        intra_op_threads=settings.ort_threads,
        long_side=long_side,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


class FeaturesClient(DetectorClient):
    """Talks to one served backbone; loading, health and retries as for a detector."""

    async def embed(self, image: bytes, long_side: int) -> Features:
        """Patch tokens of one encoded image at ``long_side`` (one request)."""
        tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        side = grpcclient.InferInput("LONG_SIDE", [1, 1], "INT32")
        side.set_data_from_numpy(np.array([[long_side]], np.int32))
        outputs = [grpcclient.InferRequestedOutput(n) for n in (TOKENS, GRID, SIZE, IMAGE_SIZE, MODEL_INFO)]
        async with self._slots:
            result = await self._call(
                f"{self.model_name} features", self._client.infer, self.model_name, [tensor, side], outputs=outputs
            )
        data = json.loads(result.as_numpy(MODEL_INFO)[0, 0])
        model = BackboneInfo(
            name=self.model_name,
            version=int(data["version"]),
            arch=data.get("arch"),
            patch_size=int(data["patch_size"]),
            hidden_size=data.get("hidden_size"),
            note=str(data.get("note", "")),
            provider=str(data.get("provider", "")),
        )
        grid = result.as_numpy(GRID)[0]
        size = result.as_numpy(SIZE)[0]
        orig = result.as_numpy(IMAGE_SIZE)[0]
        return Features(
            tokens=result.as_numpy(TOKENS)[0],
            grid=(int(grid[0]), int(grid[1])),
            size=(int(size[0]), int(size[1])),
            image_size=(int(orig[0]), int(orig[1])),
            model=model,
        )

    async def info(self) -> ModelInfo:
        """The served version, proven by a real inference (what ``serving.control`` probes with)."""
        features = await self.embed(probe_image(), 64)
        return ModelInfo(
            name=self.model_name,
            version=features.model.version,
            classes=[],
            imgsz=list(features.size),
            provider=features.model.provider,
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def _served(settings: Settings, name: str) -> AsyncIterator[FeaturesClient]:
    """A client of ``name`` loaded (newest version that works) on the configured Triton, else on a private one."""
    repo = ModelRepository(settings.model_repository)
    if not repo.versions(name):
        raise RepositoryError(
            f"no backbone {name!r} in {repo.root}: run `labelloop backbone demo` or `labelloop backbone import`"
        )
    if repo.card(name, repo.latest(name) or 0).kind != KIND:
        raise RepositoryError(f"{name!r} in {repo.root} is not a backbone")
    timeout = max(settings.triton_timeout_s, 120.0)
    process = None
    client = FeaturesClient(settings.triton_url, name, timeout_s=timeout, retries=settings.triton_retries)
    try:
        if not await client.is_live():
            await client.close()
            # Nothing listens there: serve this repository from a tritonserver of our own, for this command.
            logger.info("no Triton at %s; starting one over %s for this command", settings.triton_url, repo.root)
            process = TritonProcess(
                repo.root,
                settings.state_dir,
                grpc_port=_free_port(),
                http_port=_free_port(),
                metrics_port=_free_port(),
                log_file=settings.state_dir / "logs" / "triton-backbone.log",
            )
            process.start()
            await asyncio.to_thread(process.wait_live, settings.triton_start_timeout_s)
            client = FeaturesClient(process.grpc_url, name, timeout_s=timeout, retries=settings.triton_retries)
        info = await load_served_version(client, repo)
        logger.info("%s version %d serves features (%s)", name, info.version, info.provider)
        yield client
    finally:
        await client.close()
        if process is not None:
            process.stop()


async def embed_files(
    settings: Settings, name: str, images: Sequence[Path], long_side: int
) -> list[Features | LabelloopError]:
    """Features of image files through Triton, in order; an image that fails gets its error in its slot."""
    async with _served(settings, name) as client:
        results: list[Features | LabelloopError] = []
        for path in images:
            try:
                results.append(await client.embed(path.read_bytes(), long_side))
            except OSError as exc:
                results.append(ConfigError(f"cannot read {path}: {exc.strerror or exc}"))
            except LabelloopError as exc:
                results.append(exc)
        return results
