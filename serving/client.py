"""Asynchronous gRPC client for the Triton-served detector.

One client keeps one gRPC channel open; requests are bounded by a semaphore, each has a deadline,
and UNAVAILABLE or DEADLINE_EXCEEDED is retried with exponential backoff. A caller's own deadline
(``time.monotonic()``, e.g. what is left of a Label Studio request) bounds all attempts together:
each gets at most what is left of it, and no retry starts once it is spent. Every tritonclient
exception is translated here into the labelloop error tree.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from core.errors import ImageError, InferenceError, LabelloopError, TritonUnavailableError
from core.settings import Settings

__all__ = ["Detection", "DetectorClient", "ImageDetections", "ModelInfo", "make_client", "probe_image"]

logger = logging.getLogger(__name__)

IMAGE_INPUT = "IMAGE"
OUTPUTS = ("DETECTIONS", "NUM_DETECTIONS", "IMAGE_SIZE", "MODEL_INFO")
# STAGE_MS columns: where the one-model variant spent an image's time, by its own clock.
STAGES = ("decode", "preprocess", "infer", "nms")
_RETRYABLE = {"StatusCode.UNAVAILABLE"}
_IMAGE_FAULT = "INVALID_ARG"


@dataclass(frozen=True)
class Detection:
    """One box in original-image pixels, display orientation."""

    label: str
    class_id: int
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class ModelInfo:
    """What the served version says about itself (read from the server, never from constants)."""

    name: str
    version: int
    classes: list[str]
    imgsz: list[int]
    provider: str


@dataclass(frozen=True)
class ImageDetections:
    """All detections for one image, with the version that produced them.

    ``stats`` holds ``round_trip_s`` (this client's clock) and, from ``detect(stages=True)``,
    ``decode_s``, ``preprocess_s``, ``infer_s``, ``nms_s`` (the Triton model's clock).
    """

    width: int
    height: int
    model: ModelInfo
    detections: list[Detection] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def model_version(self) -> int:
        return self.model.version

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "model_version": self.model_version,
            "detections": [
                {k: v for k, v in asdict(d).items() if k != "class_id"} | {"class_id": d.class_id}
                for d in self.detections
            ],
        }


def probe_image() -> bytes:
    """A tiny valid PNG: a real inference with it is the health check."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (114, 114, 114)).save(buf, format="PNG")
    return buf.getvalue()


def _one_line(exc: InferenceServerException) -> str:
    """Triton appends the python stub's traceback to load errors; keep the sentence, drop the frames."""
    lines = (exc.message() or str(exc)).splitlines()
    kept = [ln.strip() for ln in lines if ln.strip() and not ln.startswith((" ", "\t")) and ln.strip() != "At:"]
    return " ".join(kept).rstrip(";")


def _translate(exc: InferenceServerException, what: str) -> LabelloopError:
    status = str(exc.status() or "")
    message = _one_line(exc)
    if status in _RETRYABLE or "failed to connect" in message.lower():
        return TritonUnavailableError(f"{what}: Triton unreachable ({message})")
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return TritonUnavailableError(f"{what}: no answer within the deadline")
    if _IMAGE_FAULT in status or "image" in message.lower() and "decode" in message.lower():
        return ImageError(f"{what}: {message}")
    if "unknown model" in message.lower() or "is not ready" in message.lower() or "unavailable" in message.lower():
        return TritonUnavailableError(f"{what}: {message}")
    return InferenceError(f"{what}: {message}")


class DetectorClient:
    """Talks to one detector on one Triton; create and use it inside one event loop."""

    def __init__(
        self,
        url: str,
        model_name: str,
        timeout_s: float = 30.0,
        concurrency: int = 8,
        retries: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._client = grpcclient.InferenceServerClient(url=url)
        self._slots = asyncio.Semaphore(concurrency)
        self._info_cache: dict[bytes, ModelInfo] = {}

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> DetectorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, fn: Any, *args: Any, deadline: float | None = None, **kwargs: Any) -> Any:
        """Run one RPC with retries on UNAVAILABLE, all within ``deadline``, and the errors translated."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            timeout_s = self.timeout_s
            if deadline is not None:
                timeout_s = min(timeout_s, deadline - time.monotonic())
                if timeout_s <= 0:
                    raise TritonUnavailableError(f"{what}: the request's time budget was spent before Triton answered")
            try:
                return await fn(*args, client_timeout=timeout_s, **kwargs)
            except InferenceServerException as exc:
                error = _translate(exc, what)
                if not isinstance(error, TritonUnavailableError) or attempt == self.retries:
                    raise error from exc
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise TritonUnavailableError(
                        f"{error} (attempt {attempt + 1}; no retry: the request's time budget is spent)"
                    ) from exc
                logger.debug("%s: %s; retry %d in %.2fs", what, error, attempt + 1, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def detect(
        self,
        image: bytes,
        conf: float | None = None,
        iou: float | None = None,
        stages: bool = False,
        deadline: float | None = None,
    ) -> ImageDetections:
        """Detect on one encoded image (one request, so a bad image fails alone).

        ``stages`` also asks the model for its own per-stage times: the one-model python variant has
        them; the ensemble variant refuses the request (an ``InferenceError``). ``deadline``
        (``time.monotonic()``) bounds the call, the wait for a slot and retries included.
        """
        params: dict[str, Any] = {}
        if conf is not None:
            params["score_threshold"] = float(conf)
        if iou is not None:
            params["iou_threshold"] = float(iou)
        outputs = (*OUTPUTS, "STAGE_MS") if stages else OUTPUTS
        result, elapsed = await self.infer_image(image, outputs, deadline, params or None)
        model = self._model_info(result.as_numpy("MODEL_INFO")[0, 0])
        names = model.classes
        n = int(result.as_numpy("NUM_DETECTIONS")[0, 0])
        rows = result.as_numpy("DETECTIONS")[0, :n]
        width, height = (int(v) for v in result.as_numpy("IMAGE_SIZE")[0])
        stats = {"round_trip_s": elapsed}
        if stages:
            stage_ms = result.as_numpy("STAGE_MS")[0]
            stats |= {f"{name}_s": float(ms) / 1e3 for name, ms in zip(STAGES, stage_ms, strict=True)}
        detections = [
            Detection(
                label=names[int(c)] if 0 <= int(c) < len(names) else str(int(c)),
                class_id=int(c),
                score=float(s),
                x1=float(x1),
                y1=float(y1),
                x2=float(x2),
                y2=float(y2),
            )
            for x1, y1, x2, y2, s, c in rows
        ]
        return ImageDetections(
            width=width,
            height=height,
            model=model,
            detections=detections,
            stats=stats,
        )

    async def infer_image(
        self,
        image: bytes,
        outputs: Sequence[str],
        deadline: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> tuple[Any, float]:
        """One request carrying one encoded image: the result and its round trip once a slot was free."""
        tensor = grpcclient.InferInput(IMAGE_INPUT, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        async with self._slots:
            started = time.perf_counter()
            result = await self._call(
                f"{self.model_name} inference",
                self._client.infer,
                self.model_name,
                [tensor],
                outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                parameters=parameters,
                deadline=deadline,
            )
            return result, time.perf_counter() - started

    async def detect_many(
        self, images: Sequence[bytes], conf: float | None = None, iou: float | None = None
    ) -> list[ImageDetections | LabelloopError]:
        """Detect on many images concurrently; a failure is returned in its slot, not raised."""

        async def one(data: bytes) -> ImageDetections | LabelloopError:
            try:
                return await self.detect(data, conf=conf, iou=iou)
            except LabelloopError as exc:
                return exc

        return list(await asyncio.gather(*(one(d) for d in images)))

    def _model_info(self, raw: bytes) -> ModelInfo:
        """MODEL_INFO of the version that answered, parsed once per distinct value."""
        info = self._info_cache.get(raw)
        if info is None:
            data = json.loads(raw)
            info = ModelInfo(
                name=self.model_name,
                version=int(data["version"]),
                classes=list(data["names"]),
                imgsz=list(data["imgsz"]),
                provider=str(data.get("provider", "")),
            )
            self._info_cache[raw] = info
        return info

    async def info(self) -> ModelInfo:
        """Version, classes and imgsz of what is served now, proven by a real inference."""
        return (await self.detect(probe_image())).model

    async def is_live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=min(self.timeout_s, 5.0)))
        except InferenceServerException:
            return False

    async def load(self, config_override: dict[str, Any] | None = None) -> None:
        """(Re)load the model from the repository; Triton keeps the old version if this fails."""
        config = json.dumps(config_override) if config_override is not None else None
        try:
            await self._client.load_model(self.model_name, config=config, client_timeout=self.timeout_s * 4)
        except InferenceServerException as exc:
            raise InferenceError(f"loading {self.model_name} failed: {_one_line(exc)}") from exc

    async def unload(self) -> None:
        try:
            await self._client.unload_model(self.model_name, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise InferenceError(f"unloading {self.model_name} failed: {_one_line(exc)}") from exc

    async def ready_versions(self) -> list[int]:
        """Versions Triton reports READY for this model (from the repository index)."""
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, "repository index") from exc
        return sorted(
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == self.model_name and m.get("state") == "READY" and m.get("version")
        )


def config_from_pbtxt(text: str) -> dict[str, Any]:
    """Parse a ``config.pbtxt`` into the JSON form Triton's load API accepts as an override."""
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


@asynccontextmanager
async def open_client(
    url: str, model_name: str, timeout_s: float = 30.0, concurrency: int = 8, retries: int = 3
) -> AsyncIterator[DetectorClient]:
    client = DetectorClient(url, model_name, timeout_s=timeout_s, concurrency=concurrency, retries=retries)
    try:
        yield client
    finally:
        await client.close()


def make_client(settings: Settings) -> DetectorClient:
    """The client for the configured model, with the configured deadline, concurrency and retries."""
    return DetectorClient(
        settings.triton_url,
        settings.model_name,
        timeout_s=settings.triton_timeout_s,
        concurrency=settings.triton_concurrency,
        retries=settings.triton_retries,
    )
