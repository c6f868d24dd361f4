"""Publish a trained candidate as version N+1, and re-publish earlier versions (promote, rollback).

Everything goes through ``serving``: ``publish_built`` writes the version atomically
and activates it with a real inference, setting it aside when that fails, so the served version
never changes on a failed publish. Re-publishing copies an earlier version's exact ONNX and
weights into a NEW version: versions are never rewritten or deleted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LabelloopError, PublishError, RepositoryError
from core.settings import Settings
from serving.client import ModelInfo, make_client
from serving.control import activate_version
from serving.publish import BuiltModel, detector_config, publish_built
from serving.repository import ModelCard, ModelRepository
from trainer.history import History

__all__ = ["ServedModel", "find_served", "promote", "publish_candidate", "rollback"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """The version Triton serves (or, with Triton down, the one it would serve at start) and its files."""

    version: int
    card: ModelCard
    onnx: Path
    weights: Path | None
    live: bool


async def _triton_version(settings: Settings) -> int | None:
    """The version Triton proves it serves with a real inference; None when it is not running."""
    async with make_client(settings) as client:
        if not await client.is_live():
            return None
        try:
            return (await client.info()).version
        except LabelloopError as exc:
            logger.warning("Triton at %s is up but does not serve %s: %s", client.url, settings.model_name, exc)
            return None


def find_served(settings: Settings) -> ServedModel | None:
    """What is served now; with Triton down, the newest version in the repository."""
    repo = ModelRepository(settings.model_repository)
    name = settings.model_name
    version = asyncio.run(_triton_version(settings))
    live = version is not None
    if version is None:
        version = repo.latest(name)
        if version is None:
            return None
        logger.info("Triton is not serving %s; using the repository's newest version %d", name, version)
    card = repo.card(name, version)
    onnx = repo.onnx_path(name, version)
    if not onnx.is_file():
        raise RepositoryError(f"{name} version {version} has no {onnx.name}")
    return ServedModel(version, card, onnx, repo.weights_path(name, version), live)


def publish_candidate(
    settings: Settings,
    built: BuiltModel,
    weights: Path,
    *,
    imgsz: int,
    metrics: dict[str, Any],
    dataset_hash: str,
    parent_version: int | None,
    classes: list[str],
    train_args: dict[str, Any],
    note: str = "",
) -> tuple[int, ModelInfo | None]:
    """Publish a built candidate and its weights as the next version, with a full card; activate it if Triton runs."""
    card = ModelCard(
        name=settings.model_name,
        version=0,
        classes=list(classes),
        imgsz=imgsz,
        parent_version=parent_version,
        metrics=metrics,
        dataset_hash=dataset_hash,
        train_args=train_args,
        note=note,
    )
    try:
        return publish_built(settings, built, weights, card)
    except PublishError:
        raise
    except LabelloopError as exc:
        raise PublishError(f"could not publish {weights}: {exc}; the served version is unchanged") from exc


async def _activate_if_live(settings: Settings, repo: ModelRepository, version: int) -> ModelInfo | None:
    async with make_client(settings) as client:
        if not await client.is_live():
            logger.info("Triton is not running; version %d is served at its next start", version)
            return None
        return await activate_version(client, repo, version)


def _republish(settings: Settings, source: int, note: str) -> tuple[int, ModelInfo | None]:
    """Copy ``source``'s exact ONNX, weights and card into a new version, then activate it."""
    repo = ModelRepository(settings.model_repository)
    name = settings.model_name
    if source not in repo.versions(name):
        raise PublishError(f"{name} has no version {source} (versions: {repo.versions(name)})")
    old = repo.card(name, source)
    card = ModelCard(
        name=name,
        version=0,
        classes=list(old.classes),
        imgsz=old.imgsz,
        parent_version=old.parent_version,
        metrics=dict(old.metrics),
        dataset_hash=old.dataset_hash,
        train_args=dict(old.train_args),
        note=note,
        precision=old.precision,
        quantization=dict(old.quantization),
    )
    try:
        repo.write_config(detector_config(settings))
        version = repo.add_version(card, repo.onnx_path(name, source), repo.weights_path(name, source))
    except LabelloopError as exc:
        raise PublishError(f"could not re-publish version {source}: {exc}; the served version is unchanged") from exc
    return version, asyncio.run(_activate_if_live(settings, repo, version))


def _history(settings: Settings) -> History:
    return History(settings.state_dir / "trainer" / "history.jsonl")


def promote(settings: Settings, version: int) -> tuple[int, ModelInfo | None]:
    """Serve ``version`` again by re-publishing its artefacts as a new version (no-op if it is served)."""
    served = find_served(settings)
    if served is not None and served.version == version:
        logger.info("version %d is already served", version)
        return version, None
    new, info = _republish(settings, version, f"promote: re-publishes v{version}")
    _history(settings).append(
        {
            "kind": "promote",
            "source_version": version,
            "replaced_version": served.version if served else None,
            "published_version": new,
        }
    )
    return new, info


def _rollback_target(settings: Settings, served: ServedModel) -> int:
    """The newest older version that is neither the served model's artefacts nor one rolled back from."""
    repo = ModelRepository(settings.model_repository)
    name = settings.model_name
    rejected = {r.get("rolled_back_from") for r in _history(settings).records() if r.get("kind") == "rollback"}
    shunned = {served.card.onnx_sha256} | {repo.card(name, v).onnx_sha256 for v in repo.versions(name) if v in rejected}
    for version in reversed(repo.versions(name)):
        if version < served.version and version not in rejected and repo.card(name, version).onnx_sha256 not in shunned:
            return version
    raise PublishError(f"there is no earlier version of {name} to roll back to from version {served.version}")


def rollback(settings: Settings, to: int | None = None) -> tuple[int, int, ModelInfo | None]:
    """Re-publish an earlier version's artefacts as a NEW version; returns (new, source, served info)."""
    served = find_served(settings)
    if served is None:
        raise PublishError(f"{settings.model_name} has no version to roll back from")
    source = to if to is not None else _rollback_target(settings, served)
    new, info = _republish(settings, source, f"rollback from v{served.version}: re-publishes v{source}")
    _history(settings).append(
        {"kind": "rollback", "source_version": source, "rolled_back_from": served.version, "published_version": new}
    )
    return new, source, info
