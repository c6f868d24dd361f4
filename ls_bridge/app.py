"""The Label Studio ML backend: an ASGI app that answers Label Studio with pre-labels from Triton.

    GET  /health    UP only when Triton answers a real inference (Label Studio waits 1 s)
    POST /setup     the served ``model_version``; checks the label config (3 s)
    POST /predict   one prediction per task, in order, each with ``model_version`` (100 s)
    POST /webhook   stores the event for the trainer, 201
    GET  /metrics   Prometheus text

Every route sits behind HTTP basic auth when both ``basic_auth_user`` and ``basic_auth_pass`` are set.
Expected failures answer ``{"detail", "error"}`` with the error class's status, never a traceback.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from core.errors import ConfigError, LabelloopError, TritonUnavailableError
from core.events import EventStore
from core.fetch import ImageFetcher
from core.settings import Settings
from ls_bridge.controls import plan_for_config
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.predictor import Predictor, model_version_name
from ls_bridge.schemas import (
    ErrorResponse,
    HealthResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    WebhookEvent,
    WebhookResponse,
)
from serving.client import DetectorClient, make_client

__all__ = ["BridgeState", "create_app"]

logger = logging.getLogger(__name__)

# Label Studio gives /health 1 s and /setup 3 s: the probe must answer well inside that.
PROBE_TIMEOUT_S = 0.9
_PATHS = frozenset({"/health", "/setup", "/predict", "/webhook", "/metrics"})


@dataclass
class BridgeState:
    """What the routes share; built in the lifespan, inside the server's event loop."""

    predictor: Predictor
    probe: DetectorClient
    events: EventStore
    metrics: BridgeMetrics


def _state(request: Request) -> BridgeState:
    bridge: BridgeState = request.app.state.bridge
    return bridge


# Module level: FastAPI resolves the (postponed) annotations against the module's globals.
State = Annotated[BridgeState, Depends(_state)]


_BASIC = HTTPBasic(auto_error=False, realm="labelloop-bridge")
BasicCredentials = Annotated[HTTPBasicCredentials | None, Depends(_BASIC)]


class _BasicAuth:
    """The app-wide dependency that demands the configured basic-auth credentials."""

    def __init__(self, user: str, password: str) -> None:
        self._user = user.encode()
        self._password = password.encode()

    def __call__(self, credentials: BasicCredentials) -> None:
        good = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), self._user)
            & secrets.compare_digest(credentials.password.encode(), self._password)
        )
        if not good:
            raise HTTPException(
                status_code=401,
                detail="basic auth credentials are missing or wrong",
                headers={"WWW-Authenticate": 'Basic realm="labelloop-bridge"'},
            )


def _basic_auth(settings: Settings) -> list[Any]:
    """Basic auth on every route when user and password are set; ConfigError when only one is."""
    user = settings.basic_auth_user
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else None
    if not user and not password:
        return []
    if not user or not password:
        raise ConfigError("basic auth needs both BASIC_AUTH_USER and BASIC_AUTH_PASS (only one is set)")
    return [Depends(_BasicAuth(user, password))]


def create_app(settings: Settings) -> FastAPI:
    """The bridge for these settings; Triton and Label Studio are contacted only once it runs."""
    if not settings.label_studio_url:
        logger.warning("LABEL_STUDIO_URL is not set: only plain http(s) image URLs can be fetched")
    metrics = BridgeMetrics()
    events = EventStore.for_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        detector = make_client(settings)
        probe = DetectorClient(
            settings.triton_url, settings.model_name, timeout_s=PROBE_TIMEOUT_S, concurrency=2, retries=0
        )
        fetcher = ImageFetcher(settings)
        app.state.bridge = BridgeState(Predictor(settings, detector, fetcher, metrics), probe, events, metrics)
        try:
            info = await probe.info()
            logger.info(
                "bridge ready: %s from Triton %s, classes %s; images from %s",
                model_version_name(info.name, info.version),
                settings.triton_url,
                ", ".join(info.classes),
                ", ".join(sorted(fetcher.allowed_hosts)) or "nowhere (set LABEL_STUDIO_URL or LABELLOOP_ALLOWED_HOSTS)",
            )
        except LabelloopError as exc:
            logger.warning("Triton does not answer yet (%s); /health says DOWN until it does", exc)
        try:
            yield
        finally:
            await fetcher.aclose()
            await detector.close()
            await probe.close()

    app = FastAPI(
        title="labelloop bridge",
        description="Label Studio ML backend serving pre-labels from Triton.",
        lifespan=lifespan,
        dependencies=_basic_auth(settings),
    )

    @app.exception_handler(LabelloopError)
    async def labelloop_error(request: Request, exc: LabelloopError) -> JSONResponse:
        logger.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.errors.inc(where="request", error=type(exc).__name__)
        body = ErrorResponse(detail=str(exc), error=type(exc).__name__)
        return JSONResponse(body.model_dump(), status_code=exc.http_status)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        path = request.url.path if request.url.path in _PATHS else "other"
        metrics.requests.inc(path=path, status=str(response.status_code))
        return response

    @app.get("/health", response_model=HealthResponse)
    async def health(bridge: State) -> JSONResponse:
        """UP only when Triton runs a real inference for the configured model right now."""
        try:
            info = await bridge.probe.info()
        except LabelloopError as exc:
            down = HealthResponse(status="DOWN", detail=f"{type(exc).__name__}: {exc}")
            return JSONResponse(down.model_dump(), status_code=TritonUnavailableError.http_status)
        up = HealthResponse(
            status="UP", model_version=model_version_name(info.name, info.version), classes=info.classes
        )
        return JSONResponse(up.model_dump())

    @app.post("/setup")
    async def setup(request: SetupRequest, bridge: State) -> SetupResponse:
        """The served model version; a label config with nothing to predict is refused here already."""
        info = await bridge.probe.info()
        if request.label_config:
            plan_for_config(request.label_config, tuple(info.classes), settings.conf)
        return SetupResponse(model_version=model_version_name(info.name, info.version))

    @app.post("/predict")
    async def predict(request: PredictRequest, bridge: State) -> PredictResponse:
        """One prediction per task, in order; failed tasks answer empty and the batch goes on."""
        if not request.label_config:
            raise ConfigError("the request carries no label_config")
        started = time.perf_counter()
        results = await bridge.predictor.predict(request.tasks, request.label_config)
        logger.info("predicted %d tasks in %.1fs", len(results), time.perf_counter() - started)
        return PredictResponse(results=results)

    @app.post("/webhook", status_code=201)
    def webhook(payload: WebhookEvent, bridge: State) -> WebhookResponse:
        """Store the event for the trainer (sync: SQLite commits run in the thread pool)."""
        event = bridge.events.append(payload.model_dump())
        logger.debug("stored %s event %d (task %s)", event.action, event.id, event.task_id)
        return WebhookResponse(id=event.id)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=BridgeMetrics.CONTENT_TYPE)

    return app
