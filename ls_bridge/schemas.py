"""Wire models of the Label Studio ML backend protocol, with Label Studio's own field names."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "BrushRegion",
    "BrushValue",
    "ChoicesRegion",
    "ChoicesValue",
    "ErrorResponse",
    "HealthResponse",
    "KeyPointRegion",
    "KeyPointValue",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "RectangleRegion",
    "RectangleValue",
    "Region",
    "SetupRequest",
    "SetupResponse",
    "Task",
    "WebhookEvent",
    "WebhookResponse",
]


class _Incoming(BaseModel):
    """Label Studio adds fields between releases: keep what we do not read instead of failing."""

    model_config = ConfigDict(extra="allow")


class Task(_Incoming):
    """One task as Label Studio serialises it; ``data`` holds the object values (``$image``)."""

    id: int
    data: dict[str, Any] = Field(default_factory=dict)
    project: int | None = None
    predictions: list[dict[str, Any]] = Field(default_factory=list)


class SetupRequest(_Incoming):
    """``POST /setup``; sent before every prediction cycle, answered within 3 s."""

    project: str | None = None
    # "schema" would shadow BaseModel.schema, hence the alias.
    label_config: str | None = Field(None, alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(None, repr=False)
    extra_params: dict[str, Any] | None = None

    @field_validator("extra_params", mode="before")
    @classmethod
    def _parse_extra_params(cls, value: Any) -> Any:
        """Label Studio's Connect Model form sends its "Extra params" textarea as text: empty or JSON."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise PydanticCustomError(
                "extra_params_json",
                'extra params are not valid JSON ({error}); leave Label Studio\'s "Extra params" '
                "(Connect Model) empty or write a JSON object",
                {"error": str(exc)},
            ) from exc
        if not isinstance(parsed, dict):
            raise PydanticCustomError(
                "extra_params_object",
                "extra params must be a JSON object, not {kind}",
                {"kind": type(parsed).__name__},
            )
        return parsed


class SetupResponse(BaseModel):
    model_version: str


class PredictRequest(_Incoming):
    """``POST /predict``: a batch of tasks with the project's label config."""

    tasks: list[Task]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class RectangleValue(BaseModel):
    """Percent of the displayed image, top-left origin."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    rectanglelabels: list[str]


class RectangleRegion(BaseModel):
    """One pre-labelled box, exactly as Label Studio stores a ``rectanglelabels`` result."""

    id: str
    from_name: str
    to_name: str
    type: Literal["rectanglelabels"] = "rectanglelabels"
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: RectangleValue
    score: float


class ChoicesValue(BaseModel):
    choices: list[str]


class ChoicesRegion(BaseModel):
    """One pre-labelled image class, as Label Studio stores a ``choices`` result; ``meta`` shows every probability."""

    id: str
    from_name: str
    to_name: str
    type: Literal["choices"] = "choices"
    value: ChoicesValue
    score: float
    meta: dict[str, Any] = Field(default_factory=dict)


class BrushValue(BaseModel):
    """A mask as Label Studio's RGBA run-length code (:mod:`core.brush_rle`) of the whole image."""

    format: Literal["rle"] = "rle"
    rle: list[int]
    brushlabels: list[str]


class BrushRegion(BaseModel):
    """One pre-labelled mask, as Label Studio stores a ``brushlabels`` result."""

    id: str
    from_name: str
    to_name: str
    type: Literal["brushlabels"] = "brushlabels"
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: BrushValue
    score: float


class KeyPointValue(BaseModel):
    """A point: its position in percent of the image, top-left origin; ``width`` is its drawn size, percent."""

    x: float
    y: float
    width: float
    keypointlabels: list[str]


class KeyPointRegion(BaseModel):
    """One suggested point, as Label Studio stores a ``keypointlabels`` result."""

    id: str
    from_name: str
    to_name: str
    type: Literal["keypointlabels"] = "keypointlabels"
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: KeyPointValue
    score: float


Region = RectangleRegion | ChoicesRegion | BrushRegion | KeyPointRegion


class Prediction(BaseModel):
    """One task's answer: its results, the task's uncertainty score and the served model version."""

    result: list[Region] = Field(default_factory=list)
    score: float = 0.0
    model_version: str


class PredictResponse(BaseModel):
    results: list[Prediction]


class HealthResponse(BaseModel):
    status: Literal["UP", "DOWN"]
    model_class: str = "labelloop-bridge"
    model_version: str | None = None
    classes: list[str] = Field(default_factory=list)
    detail: str | None = None


class WebhookEvent(_Incoming):
    """A webhook body: ``action`` plus whatever Label Studio sends with it (project, task, annotation)."""

    action: str = Field(min_length=1)


class WebhookResponse(BaseModel):
    status: Literal["ok"] = "ok"
    id: int


class ErrorResponse(BaseModel):
    """The body of every expected failure: a message and the labelloop error class."""

    detail: str
    error: str
