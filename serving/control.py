"""Which version Triton serves: load the newest one that works, and switch versions safely.

Triton (explicit mode, ``latest: 1``) keeps serving version N while N+1 loads, and keeps N if
N+1 fails. What it does not do is start on an older version when the newest is broken, nor
notice that a loaded python model cannot answer; both are handled here with real inferences.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from core import kinds
from core.errors import ConfigError, LabelloopError, PublishError, RepositoryError
from serving.client import DetectorClient, ModelInfo, config_from_pbtxt
from serving.repository import ModelRepository

__all__ = ["activate_version", "kind_client", "load_repository", "load_served_version"]

logger = logging.getLogger(__name__)


async def _load_and_probe(client: DetectorClient, pin: int | None, config_text: str) -> ModelInfo:
    override = None
    if pin is not None:
        override = config_from_pbtxt(config_text)
        override["version_policy"] = {"specific": {"versions": [pin]}}
    await client.load(override)
    return await client.info()


async def load_served_version(client: DetectorClient, repo: ModelRepository) -> ModelInfo:
    """Load the newest version that loads and answers; fall back to older ones, newest first."""
    name = client.model_name
    versions = repo.versions(name)
    if not versions:
        raise RepositoryError(
            f"model {name!r} has no versions in {repo.root}: run `labelloop bootstrap` or `labelloop export`"
        )
    config_text = (repo.model_dir(name) / "config.pbtxt").read_text()
    failures: list[str] = []
    for position, version in enumerate(reversed(versions)):
        try:
            info = await _load_and_probe(client, None if position == 0 else version, config_text)
        except LabelloopError as exc:
            failures.append(f"v{version}: {exc}")
            logger.error("%s version %d does not load: %s", name, version, exc)
            continue
        if failures:
            logger.warning("serving %s version %d; newer versions failed: %s", name, info.version, failures)
        return info
    raise RepositoryError(f"no version of {name!r} loads: " + "; ".join(failures))


async def activate_version(client: DetectorClient, repo: ModelRepository, version: int) -> ModelInfo:
    """Make a freshly written ``version`` the served one, or leave the served version untouched.

    On failure the new version is set aside (renamed out of Triton's sight) and the previous
    version is reloaded, so the server ends where it started.
    """
    name = client.model_name
    try:
        await client.load()
        info = await client.info()
        if info.version != version:
            raise PublishError(f"Triton serves version {info.version} after loading, expected {version}")
        logger.info("%s version %d is now served", name, version)
        return info
    except LabelloopError as exc:
        repo.set_aside(name, version, f"activation failed: {exc}")
        if not repo.versions(name):
            raise PublishError(f"version {version} was not activated ({exc}); there is no earlier version") from exc
        try:
            restored = await load_served_version(client, repo)
        except LabelloopError as again:
            raise PublishError(f"version {version} failed ({exc}) and restoring failed too: {again}") from again
        raise PublishError(
            f"version {version} was not activated ({exc}); still serving version {restored.version}"
        ) from exc


def kind_client(kind: str, url: str, model_name: str, **options: Any) -> DetectorClient:
    """A client of one model, of the class its kind names (``Kind.client``): it knows how to probe the model."""
    try:
        entry = kinds.kind(kind)
    except ConfigError as exc:
        raise RepositoryError(f"{model_name}: {exc}") from exc
    if entry.client is None:
        raise RepositoryError(f"{model_name} is a {kind}, which labelloop cannot serve yet")
    module, _, name = entry.client.rpartition(".")
    factory = getattr(importlib.import_module(module), name)
    client: DetectorClient = factory(url, model_name, **options)
    return client


async def load_repository(
    url: str, repo: ModelRepository, first: str | None = None, **options: Any
) -> list[tuple[str, ModelInfo]]:
    """Load every model in ``repo`` (each its newest version that works), ``first`` first: (kind, info) each.

    Every model must load: a model left unloaded would fail its users' requests later, and less clearly.
    """

    # ``first``, then kinds that answer no control (backbones): the heads that reach them by BLS load after.
    def order(name: str) -> tuple[bool, bool, str]:
        entry = kinds.KINDS.get(repo.kind(name))
        return name != first, entry is None or bool(entry.control_tags), name

    names = sorted({*repo.models(), *([first] if first is not None else [])}, key=order)
    loaded = []
    for name in names:
        kind = repo.kind(name)
        client = kind_client(kind, url, name, **options)
        try:
            loaded.append((kind, await load_served_version(client, repo)))
        finally:
            await client.close()
    return loaded
