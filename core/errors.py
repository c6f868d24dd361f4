"""The labelloop exception tree.

    LabelloopError
    ├── ConfigError            settings, label configs, CLI arguments that cannot work
    ├── ServingError
    │   ├── TritonUnavailableError   the server cannot be reached or is not ready
    │   ├── InferenceError           the server answered, but not with detections
    │   ├── ImageError               one image cannot be decoded / is too large
    │   ├── RepositoryError          model repository layout, versions, exports
    │   └── QuantizationError        no INT8 model, or one that strays from FP32
    ├── FetchError             an image URL could not (or must not) be fetched
    ├── LabelStudioError       the Label Studio API refused or failed
    ├── DatasetError           an export / annotations cannot become a YOLO dataset
    ├── TrainingError          ultralytics training or evaluation failed
    └── PublishError           a new version could not be made the served one

Third-party exceptions are translated at the edges (``serving.client``,
``trainer.train``) with ``raise ... from exc``; core code catches only these.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetError",
    "FetchError",
    "ImageError",
    "InferenceError",
    "LabelStudioError",
    "LabelloopError",
    "PublishError",
    "QuantizationError",
    "RepositoryError",
    "ServingError",
    "TrainingError",
    "TritonUnavailableError",
]


class LabelloopError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    http_status: int = 500


class ConfigError(LabelloopError):
    """A setting, argument or label config that cannot work."""

    http_status = 400


class ServingError(LabelloopError):
    """Something on the Triton side failed."""

    http_status = 502


class TritonUnavailableError(ServingError):
    """Triton cannot be reached, or the model is not ready."""

    http_status = 503


class InferenceError(ServingError):
    """Triton answered with an error for a request."""


class ImageError(ServingError):
    """One image is corrupt, empty or too large."""

    http_status = 422


class RepositoryError(ServingError):
    """The model repository or one of its versions is not usable."""

    http_status = 500


class QuantizationError(ServingError):
    """An INT8 model could not be made, or it strays too far from its FP32 source."""


class FetchError(LabelloopError):
    """An image could not be fetched, or its host is not allowed."""

    http_status = 502


class LabelStudioError(LabelloopError):
    """The Label Studio API refused or failed a call."""

    http_status = 502


class DatasetError(LabelloopError):
    """Annotations or an export cannot become a YOLO dataset."""

    http_status = 422


class TrainingError(LabelloopError):
    """Training or evaluation failed."""


class PublishError(LabelloopError):
    """A version could not be published; the served version is unchanged."""
