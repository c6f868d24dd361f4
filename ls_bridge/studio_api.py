"""The few Label Studio REST calls ``labelloop prelabel`` needs; httpx errors become LabelStudioError."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from core.errors import LabelStudioError
from core.studio_auth import LabelStudioAuth
from ls_bridge.schemas import Prediction, Task

__all__ = ["StudioAPI"]

logger = logging.getLogger(__name__)

_API_TIMEOUT_S = 60.0


class StudioAPI:
    """An async Label Studio client for one base URL; use as ``async with``."""

    def __init__(self, base_url: str, auth: LabelStudioAuth | None) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), auth=auth, timeout=_API_TIMEOUT_S, trust_env=False
        )

    async def __aenter__(self) -> StudioAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, *, none_if_missing: bool = False, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if none_if_missing and response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise LabelStudioError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError as exc:
            raise LabelStudioError(f"{method} {path}: the answer is not JSON") from exc

    async def project(self, project_id: int) -> dict[str, Any]:
        """The project, with ``label_config`` and ``task_number``."""
        result: dict[str, Any] = await self._call("GET", f"/api/projects/{project_id}/")
        return result

    async def task_pages(self, project_id: int, page_size: int) -> AsyncIterator[list[Task]]:
        """All tasks of a project with their predictions, one page at a time, in id order."""
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all"}
            # Label Studio answers 404 ("Invalid page.") past the last page.
            body = await self._call("GET", "/api/tasks/", none_if_missing=page > 1, params=params)
            if body is None:
                return
            tasks = body.get("tasks", []) if isinstance(body, Mapping) else body
            if not tasks:
                return
            yield [Task.model_validate(t) for t in tasks]
            if len(tasks) < page_size:
                return
            page += 1

    async def import_predictions(self, project_id: int, items: Sequence[tuple[int, Prediction]]) -> None:
        """Store predictions for tasks in one call."""
        body = [{"task": task_id, **prediction.model_dump()} for task_id, prediction in items]
        await self._call("POST", f"/api/projects/{project_id}/import/predictions", json=body)
