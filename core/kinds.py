"""The model kinds: one small descriptor per kind, so that adding a kind is one entry plus its own modules.

A descriptor is data plus references (dotted module paths, resolved by whoever needs them), never a
base class: which Label Studio control tags the kind answers, which Triton models serve it and with
which tensors, the metric its deploy rule reads, and where its code lives in each layer. Generic
code asks the registry instead of testing ``kind == "detector"``: the repository copies a version's
Triton runtime from ``Kind.runtime``, ``labelloop serve`` probes each model with ``Kind.client``.

A module path of ``None`` means the kind has no code in that layer (yet); ``available=False`` marks
a kind that is announced but cannot be served or trained today.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from core.errors import ConfigError

__all__ = [
    "KINDS",
    "DeployRule",
    "Kind",
    "RuntimeFile",
    "TritonModel",
    "kind",
    "register_kind",
    "runtime_source",
]


@dataclass(frozen=True)
class TritonModel:
    """One Triton model of a kind: named ``<model name><suffix>``, with its input and output tensors."""

    suffix: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeployRule:
    """The promotion rule's metric and thresholds (the seed project's values by default)."""

    metric: str
    retrain_below: float = 0.60
    retrain_delta: float = -0.03
    deploy_margin: float = 0.02


@dataclass(frozen=True)
class RuntimeFile:
    """A file copied into every version folder: the source module (dotted path) and its name there."""

    module: str
    name: str


@dataclass(frozen=True)
class Kind:
    """What one model kind is and where its code lives, layer by layer."""

    name: str
    # Label Studio control tags the kind's predictions fill (empty: it fills none itself).
    control_tags: tuple[str, ...]
    triton_models: tuple[TritonModel, ...]
    # None: not deployed by the rule (a backbone is imported, never trained here).
    rule: DeployRule | None
    # Triton python-backend files of a version; the one named ``model.py`` is what Triton runs.
    runtime: tuple[RuntimeFile, ...] = ()
    # serving: the client class (``module.Class``) whose ``info()`` proves a served version answers.
    client: str | None = None
    # ls_bridge: model output to Label Studio results.
    results: str | None = None
    # trainer: Label Studio annotations to a dataset, training, evaluation.
    dataset: str | None = None
    training: str | None = None
    evaluation: str | None = None
    # session: ``module.function(session)`` rendering the Label Studio label config a session of the kind gets.
    label_config: str | None = None
    # trainer: the module whose ``run(settings, project, session)``, ``request_stop`` and ``summary`` train a session.
    session_run: str | None = None
    # Label Studio connects the model as interactive: a person's clicks reach /predict as they are placed.
    interactive: bool = False
    available: bool = True
    description: str = field(default="", compare=False)

    @property
    def metric(self) -> str | None:
        """The primary metric of the deploy rule (None for a kind that is never deployed by it)."""
        return self.rule.metric if self.rule is not None else None

    def modules(self) -> dict[str, str]:
        """Every module the kind names, by role (runtime files as ``runtime:<file name>``)."""
        named = {
            "client": self.client.rpartition(".")[0] if self.client else None,
            "results": self.results,
            "dataset": self.dataset,
            "training": self.training,
            "evaluation": self.evaluation,
            "label_config": self.label_config.rpartition(".")[0] if self.label_config else None,
            "session_run": self.session_run,
        }
        found = {role: module for role, module in named.items() if module}
        return found | {f"runtime:{f.name}": f.module for f in self.runtime}


KINDS: dict[str, Kind] = {}


def register_kind(entry: Kind, *, replace: bool = False) -> Kind:
    """Add a kind to the registry; a second entry under a taken name needs ``replace=True``."""
    current = KINDS.get(entry.name)
    if current is not None and current != entry and not replace:
        raise ConfigError(f"model kind {entry.name!r} is registered already")
    KINDS[entry.name] = entry
    return entry


def kind(name: str) -> Kind:
    """The descriptor of ``name``, or a ConfigError naming the known kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown model kind {name!r}; known: {', '.join(sorted(KINDS))}") from None


def runtime_source(module: str) -> Path:
    """The source file of a dotted module path, found without running the module.

    Triton runtime files import ``triton_python_backend_utils``, which exists only inside Triton.
    """
    try:
        spec = find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"module {module!r} cannot be found: {exc}") from exc
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ConfigError(f"module {module!r} is not a Python source file on the path")
    return Path(spec.origin)


_IMAGE_DECODE = RuntimeFile("core.image_decode", "image_decode.py")
_HEAD_OPS = RuntimeFile("serving.triton.head_ops", "head_ops.py")

_BUILTIN = (
    Kind(
        name="detector",
        description="boxes from a YOLO detector served whole (decode, letterbox, ONNX, NMS) by one python model",
        control_tags=("RectangleLabels",),
        triton_models=(
            TritonModel(
                suffix="",
                inputs=("IMAGE",),
                outputs=("DETECTIONS", "NUM_DETECTIONS", "IMAGE_SIZE", "MODEL_INFO", "STAGE_MS"),
            ),
        ),
        rule=DeployRule("map50"),
        runtime=(
            RuntimeFile("serving.triton.model", "model.py"),
            RuntimeFile("serving.triton.detector_ops", "detector_ops.py"),
            _IMAGE_DECODE,
        ),
        client="serving.client.DetectorClient",
        results="ls_bridge.controls",
        dataset="trainer.dataset",
        training="trainer.train",
        evaluation="trainer.evaluate",
    ),
    Kind(
        name="backbone",
        description="a frozen DINOv3 feature extractor: an encoded image in, fp16 patch tokens out",
        control_tags=(),
        triton_models=(
            TritonModel(
                suffix="",
                inputs=("IMAGE",),
                optional_inputs=("LONG_SIDE",),
                outputs=("TOKENS", "GRID", "SIZE", "IMAGE_SIZE", "MODEL_INFO"),
            ),
        ),
        rule=None,
        runtime=(
            RuntimeFile("serving.triton.backbone_model", "model.py"),
            RuntimeFile("serving.triton.features_ops", "features_ops.py"),
            _IMAGE_DECODE,
        ),
        client="serving.backbone.FeaturesClient",
    ),
    Kind(
        name="classifier",
        description="image classes from a small head on the backbone's patch tokens (BLS: one call per image)",
        control_tags=("Choices",),
        triton_models=(TritonModel(suffix="", inputs=("IMAGE",), outputs=("PROBS", "MODEL_INFO")),),
        rule=DeployRule("macro_f1"),
        runtime=(RuntimeFile("serving.triton.classifier_model", "model.py"), _HEAD_OPS),
        client="serving.heads.ClassifierClient",
        results="ls_bridge.choices",
        dataset="trainer.choices_data",
        training="trainer.classify",
        evaluation="trainer.classify",
        label_config="core.session.choices_config",
        session_run="trainer.classifier_run",
    ),
    Kind(
        name="segmenter",
        description="per-class masks from a head on the backbone's patch tokens, trained from points (BLS)",
        control_tags=("BrushLabels", "KeyPointLabels"),
        triton_models=(TritonModel(suffix="", inputs=("IMAGE",), outputs=("PROBS", "IMAGE_SIZE", "MODEL_INFO")),),
        rule=DeployRule("miou"),
        runtime=(
            RuntimeFile("serving.triton.segmenter_model", "model.py"),
            _HEAD_OPS,
            RuntimeFile("core.masks", "masks.py"),
            RuntimeFile("core.feature_cache", "feature_cache.py"),
        ),
        client="serving.heads.SegmenterClient",
        results="ls_bridge.segments",
        dataset="trainer.points_data",
        training="trainer.segment",
        evaluation="trainer.segment",
        label_config="core.session.segmenter_config",
        session_run="trainer.segmenter_run",
        interactive=True,
    ),
)
for _entry in _BUILTIN:
    register_kind(_entry)
