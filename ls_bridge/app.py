"""The Label Studio ML backend: an ASGI app that answers Label Studio with pre-labels from Triton.

    GET  /health    UP only when Triton answers a real inference (Label Studio waits 1 s)
    POST /setup     the served ``model_version``; checks the label config (3 s)
    POST /predict   one prediction per task, in order, each with ``model_version`` (100 s)
    POST /webhook   stores the event for the trainer, 201
    GET  /metrics   Prometheus text
    GET  /docs, /redoc, /openapi.json

Every route, the API docs included, sits behind HTTP basic auth unless ``bridge_auth`` is "none":
the configured pair, else the one generated into ``<state_dir>/bridge-auth.json``. Expected
failures answer ``{"detail", "error"}`` with the error class's status, never a traceback.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import ValidationError

from core.credentials import bridge_credentials
from core.errors import ConfigError, LabelloopError, TritonUnavailableError
from core.events import EventStore
from core.fetch import ImageFetcher
from core.labelmap import parse_label_config
from core.session import read_recorded
from core.settings import Settings
from core.studio import model_version_name
from ls_bridge.controls import CONTROL_MODELS, plan_for_config
from ls_bridge.heads import HeadAnswer, HeadPredictor, HeadRequest, head_controls, project_id
from ls_bridge.metrics import BridgeMetrics
from ls_bridge.predictor import Predictor
from ls_bridge.schemas import (
    ErrorResponse,
    HealthResponse,
    Prediction,
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
_PATHS = frozenset({"/health", "/setup", "/predict", "/webhook", "/metrics", "/docs", "/redoc", "/openapi.json"})
_INVALID = "RequestValidationError"
_SHOWN_PROBLEMS = 5  # a 500-task /predict with one bad field would otherwise answer 500 lines


@dataclass
class BridgeState:
    """What the routes share; built in the lifespan, inside the server's event loop."""

    predictor: Predictor
    heads: HeadPredictor
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


def _auth_dependencies(settings: Settings) -> list[Any]:
    """Basic auth on every route unless ``bridge_auth`` is explicitly "none"."""
    if settings.bridge_auth == "none":
        logger.warning(
            "bridge_auth is 'none': anyone who reaches %s:%d can read /docs, run /predict and write /webhook",
            settings.bridge_host,
            settings.bridge_port,
        )
        return []
    credentials = bridge_credentials(settings)
    assert credentials is not None  # create=True always yields a pair
    return [Depends(_BasicAuth(credentials.user, credentials.password.get_secret_value()))]


def _problems(errors: Sequence[Any]) -> str:
    """Pydantic's errors as one line: ``field: message; ...`` (the body prefix dropped, the first few)."""
    lines = []
    for error in errors[:_SHOWN_PROBLEMS]:
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        lines.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    more = len(errors) - _SHOWN_PROBLEMS
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _error(status: int, detail: str, error: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(detail=detail, error=error).model_dump(), status_code=status)


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` (declared or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _serves_no_detector(probe: DetectorClient) -> bool:
    """Whether Triton is live and has no version of the detector loaded (a heads-only deployment)."""
    try:
        return await probe.is_live() and not await probe.ready_versions()
    except LabelloopError:
        return False


def _wants_boxes(config: str) -> bool:
    """Whether a config needs the detector: box controls, or nothing a head fills (then the detector says why)."""
    if not config:
        return True
    return bool(parse_label_config(config).controls_of(CONTROL_MODELS)) or not head_controls(config)


def _clicked(params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The regions of an interactive call (``params.context.result``), or an empty list for a plain one."""
    context = (params or {}).get("context")
    result = context.get("result") if isinstance(context, dict) else None
    return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


def _combine(count: int, boxes: Sequence[Prediction] | None, heads: Sequence[HeadAnswer] | None) -> list[Prediction]:
    """One prediction per task from the detector's and the heads' answers: results joined, the lower score."""
    combined = []
    for k in range(count):
        parts = []
        if boxes is not None:
            parts.append((list(boxes[k].result), boxes[k].score, [boxes[k].model_version]))
        if heads is not None:
            parts.append((list(heads[k].results), heads[k].score, heads[k].versions))
        combined.append(
            Prediction(
                result=[r for results, _, _ in parts for r in results],
                score=min(score for _, score, _ in parts),
                model_version="+".join(dict.fromkeys(v for _, _, versions in parts for v in versions)),
            )
        )
    return combined


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
        heads = HeadPredictor(settings, fetcher, metrics)
        predictor = Predictor(settings, detector, fetcher, metrics)
        app.state.bridge = BridgeState(predictor, heads, probe, events, metrics)
        try:
            info = await probe.info()
            logger.info(
                "bridge ready: %s from Triton %s, classes %s; images from %s",
                model_version_name(info.name, info.version),
                settings.triton_url,
                ", ".join(info.classes),
                ", ".join(fetcher.allowed_origins) or "nowhere (set LABEL_STUDIO_URL or LABELLOOP_ALLOWED_ORIGINS)",
            )
        except LabelloopError as exc:
            logger.warning("the detector does not answer (%s); /health is DOWN until it does, or UP heads-only", exc)
        try:
            yield
        finally:
            await fetcher.aclose()
            await heads.close()
            await detector.close()
            await probe.close()

    # FastAPI serves its own /docs, /redoc and /openapi.json outside the app's dependencies (no
    # auth): they are switched off here and served below as ordinary, authenticated routes.
    app = FastAPI(
        title="labelloop bridge",
        description="Label Studio ML backend serving pre-labels from Triton.",
        lifespan=lifespan,
        dependencies=_auth_dependencies(settings),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(LabelloopError)
    async def labelloop_error(request: Request, exc: LabelloopError) -> JSONResponse:
        logger.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.errors.inc(where="request", error=type(exc).__name__)
        return _error(exc.http_status, str(exc), type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _problems(exc.errors())
        logger.warning("%s %s: invalid request: %s", request.method, request.url.path, detail)
        metrics.errors.inc(where="request", error=_INVALID)
        return _error(422, detail, _INVALID)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.arrived = time.monotonic()  # a /predict's deadline counts from here
        response = await call_next(request)
        path = request.url.path if request.url.path in _PATHS else "other"
        metrics.requests.inc(path=path, status=str(response.status_code))
        return response

    @app.get("/health", response_model=HealthResponse)
    async def health(bridge: State) -> JSONResponse:
        """UP only when Triton runs a real inference for the configured detector right now.

        A Triton that serves no detector at all (heads only) is UP when it is live: the heads answer
        for themselves, task by task.
        """
        try:
            info = await bridge.probe.info()
        except LabelloopError as exc:
            if await _serves_no_detector(bridge.probe):
                up = HealthResponse(status="UP", detail=f"Triton serves no {settings.model_name}; heads only")
                return JSONResponse(up.model_dump())
            down = HealthResponse(status="DOWN", detail=f"{type(exc).__name__}: {exc}")
            return JSONResponse(down.model_dump(), status_code=TritonUnavailableError.http_status)
        up = HealthResponse(
            status="UP", model_version=model_version_name(info.name, info.version), classes=info.classes
        )
        return JSONResponse(up.model_dump())

    def pending_version(project: int | None) -> str:
        """What a config whose heads are not trained yet reports: the session's head at version 0."""
        session = read_recorded(settings.state_dir, project) if project is not None else None
        return model_version_name(session.model_name if session is not None else "classifier", 0)

    @app.post("/setup")
    async def setup(body: SetupRequest, bridge: State) -> SetupResponse:
        """The served model versions; a label config with nothing to predict is refused here already."""
        config = body.label_config or ""
        versions: list[str] = []
        if _wants_boxes(config):
            info = await bridge.probe.info()
            if config:
                plan_for_config(config, tuple(info.classes), settings.conf)
            versions.append(model_version_name(info.name, info.version))
        if head_controls(config):
            project = project_id(body.project)
            versions += await bridge.heads.versions(config, project) or [pending_version(project)]
        return SetupResponse(model_version="+".join(versions))

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request, bridge: State) -> PredictResponse:
        """One prediction per task, in order, within ``predict_deadline_s`` of the request's arrival."""
        config = body.label_config
        if not config:
            raise ConfigError("the request carries no label_config")
        deadline = request.state.arrived + settings.predict_deadline_s
        context = _clicked(body.params)
        if context and head_controls(config):
            return await interactive(body, context, bridge, request.state.arrived)
        boxes = await bridge.predictor.predict(body.tasks, config, deadline) if _wants_boxes(config) else None
        heads: list[HeadAnswer] | None = None
        if head_controls(config):
            project = project_id(body.project)
            assigned = await bridge.heads.assign(config, project)
            if assigned:
                request_ = HeadRequest(session=bridge.heads.session(project))
                heads = await bridge.heads.predict(body.tasks, assigned, deadline, request_)
            elif boxes is None:
                heads = [HeadAnswer(versions=[pending_version(project)]) for _ in body.tasks]
        results = _combine(len(body.tasks), boxes, heads)
        logger.info("predicted %d tasks in %.1fs", len(results), time.monotonic() - request.state.arrived)
        return PredictResponse(results=results)

    async def interactive(
        body: PredictRequest, context: list[dict[str, Any]], bridge: BridgeState, arrived: float
    ) -> PredictResponse:
        """Label Studio's smart-tool call: one task and the regions a person just placed, refined against.

        Only the heads answer, with the refined result first; a task that fails answers empty, as in a batch.
        """
        if len(body.tasks) != 1:
            raise ConfigError(f"an interactive /predict carries one task, this one {len(body.tasks)}")
        project = project_id(body.project)
        assigned = await bridge.heads.assign(str(body.label_config), project)
        request_ = HeadRequest(context=context, session=bridge.heads.session(project))
        if assigned:
            deadline = arrived + settings.predict_deadline_s
            (answer,) = await bridge.heads.predict(body.tasks, assigned, deadline, request_)
        else:
            answer = HeadAnswer(versions=[pending_version(project)])
        (result,) = _combine(1, None, [answer])
        logger.info("interactive: %d clicks answered in %.3fs", len(context), time.monotonic() - arrived)
        return PredictResponse(results=[result])

    @app.post(
        "/webhook",
        status_code=201,
        response_model=WebhookResponse,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": WebhookEvent.model_json_schema()}}}},
    )
    async def webhook(request: Request, bridge: State) -> WebhookResponse | JSONResponse:
        """Store the event for the trainer; the body is bounded while it streams in, then validated."""
        limit = settings.webhook_max_bytes
        raw = await _read_bounded(request, limit)
        if raw is None:
            metrics.errors.inc(where="request", error="PayloadTooLarge")
            logger.warning("POST /webhook: body over the %d-byte limit, refused", limit)
            return _error(
                413, f"the webhook body is over the {limit}-byte limit (webhook_max_bytes)", "PayloadTooLarge"
            )
        try:
            payload = WebhookEvent.model_validate_json(raw)
        except ValidationError as exc:
            detail = f"not a Label Studio webhook event: {_problems(exc.errors())}"
            metrics.errors.inc(where="request", error=_INVALID)
            logger.warning("POST /webhook: %s", detail)
            return _error(422, detail, _INVALID)
        # SQLite commits block: they run in the thread pool.
        event = await run_in_threadpool(bridge.events.append, payload.model_dump())
        logger.debug("stored %s event %d (task %s)", event.action, event.id, event.task_id)
        return WebhookResponse(id=event.id)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=BridgeMetrics.CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return app
