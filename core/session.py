"""A labelling session: one YAML file that says what is labelled, with which classes and how the head trains.

``labelloop session create SESSION.yaml`` reads it, makes the Label Studio project with the label
config the kind generates, and records it as ``<state_dir>/sessions/<project>.json``, where
``train`` and the watcher find it. Unknown keys, duplicate classes and bad colours are errors that
name the key, never defaults that pass silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from core.files import write_atomic

__all__ = [
    "BACKGROUND",
    "DEMO_BACKBONE",
    "SESSIONS_DIR",
    "ClassSpec",
    "RuleSpec",
    "Session",
    "TrainingSpec",
    "choices_config",
    "load_session",
    "read_recorded",
    "record_session",
    "segmenter_config",
    "slug",
]

SESSIONS_DIR = "sessions"
# The segmenter's point label for "not any class" (KeyPointLabels).
BACKGROUND = "background"
_BACKGROUND_COLOUR = "#9e9e9e"
# `backbone: demo` names the random-init demo backbone, published under this model name.
DEMO_BACKBONE = "demo"
_COLOUR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def slug(text: str) -> str:
    """A Triton-safe model name from a title (``Surface classes`` -> ``surface-classes``)."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned[:63] or "session"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(_Strict):
    """One class: its name as Label Studio shows and stores it, and its colour there."""

    name: str = Field(min_length=1, max_length=100)
    color: str = "#e6194b"

    @field_validator("color")
    @classmethod
    def _colour(cls, value: str) -> str:
        if not _COLOUR.match(value):
            raise ValueError(f"{value!r} is not a colour: write #rrggbb or #rgb")
        return value


class TrainingSpec(_Strict):
    """How the head trains (FIELD-NOTES §7's values by default)."""

    # Epochs between suspensions: checkpoint, interim predictions, stop check.
    prediction_interval: int = Field(default=20, ge=1)
    early_stop_patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.001, ge=0)
    max_epochs: int = Field(default=1000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=16, ge=2, description="Images per optimiser step.")
    interim_tasks: int = Field(default=10, ge=0, description="Unlabelled tasks predicted at each suspension.")
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)


class RuleSpec(_Strict):
    """The deploy rule's thresholds, on the kind's own metric."""

    retrain_below: float = 0.60
    retrain_delta: float = -0.03
    deploy_margin: float = 0.02


class Session(_Strict):
    """One labelling session, as written in its YAML file."""

    kind: Literal["classifier", "segmenter", "detector"]
    title: str = Field(min_length=1, max_length=200)
    # The head's model name in the repository; default: from the title.
    name: str | None = None
    images: Path | None = None
    classes: tuple[ClassSpec, ...] = Field(min_length=1)
    backbone: str = DEMO_BACKBONE
    long_side: int = Field(default=448, ge=16, le=2048)
    # Segmenters: the probability above which a pixel is in a class's mask.
    mask_threshold: float = Field(default=0.5, gt=0, lt=1)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    rule: RuleSpec = Field(default_factory=RuleSpec)
    # Set when the session is recorded for a Label Studio project.
    project: int | None = None

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r} is not a model name: letters, digits, '_', '.', '-', at most 63")
        return value

    @model_validator(mode="after")
    def _unique(self) -> Session:
        names = [c.name for c in self.classes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"classes listed twice: {', '.join(twice)}")
        if self.kind == "classifier" and len(names) < 2:
            raise ValueError("a classifier needs at least two classes")
        if self.kind == "segmenter" and any(n.lower() == BACKGROUND for n in names):
            raise ValueError(f"{BACKGROUND!r} is the segmenter's background point label, not a class")
        return self

    @property
    def model_name(self) -> str:
        return self.name or slug(self.title)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)


def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:6]:
        where = ".".join(str(p) for p in error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_session(path: Path) -> Session:
    """The session in a YAML file; relative ``images`` are resolved against the file's folder."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the session file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a session file is a YAML mapping (kind, title, classes, ...)")
    try:
        session = Session.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_problems(exc)}") from None
    if session.images is not None and not session.images.is_absolute():
        session = session.model_copy(update={"images": (path.parent / session.images).resolve()})
    return session


def _recorded_path(state_dir: Path, project: int) -> Path:
    return state_dir / SESSIONS_DIR / f"{project}.json"


def record_session(state_dir: Path, session: Session, project: int) -> Path:
    """Store the session for ``project`` so that ``train`` and the watcher use it."""
    stored = session.model_copy(update={"project": project})
    path = _recorded_path(state_dir, project)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, stored.model_dump_json(indent=2))
    return path


def read_recorded(state_dir: Path, project: int) -> Session | None:
    """The session recorded for ``project``, or None."""
    path = _recorded_path(state_dir, project)
    if not path.is_file():
        return None
    try:
        return Session.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the recorded session {path} is unreadable: {exc}") from exc


def choices_config(session: Session, **_: Any) -> str:
    """The classifier's label config: one single-choice ``<Choices>`` on the ``<Image>``."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(c.name)} background={quoteattr(c.color)}/>" for c in session.classes
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <Choices name="choice" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def segmenter_config(session: Session, **_: Any) -> str:
    """The segmenter's label config: smart ``<KeyPointLabels>`` (classes + background) and ``<BrushLabels>``.

    ``smart="true"`` makes Label Studio send each point a person places to the interactive model.
    """
    labels = [f"    <Label value={quoteattr(c.name)} background={quoteattr(c.color)}/>" for c in session.classes]
    background = f"    <Label value={quoteattr(BACKGROUND)} background={quoteattr(_BACKGROUND_COLOUR)}/>"
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <KeyPointLabels name="points" toName="image" smart="true">\n'
        + "\n".join([*labels, background])
        + "\n  </KeyPointLabels>\n"
        '  <BrushLabels name="mask" toName="image">\n' + "\n".join(labels) + "\n  </BrushLabels>\n"
        "</View>\n"
    )
