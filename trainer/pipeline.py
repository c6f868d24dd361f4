"""One training run end to end, the first model (bootstrap), and the watcher that starts runs.

A run: collect verified annotations -> rebuild the dataset and extend the frozen held-out set ->
evaluate the served version -> fine-tune from its weights -> evaluate the candidate on the same
held-out set, as it would be served (the ONNX, INT8 when the settings ask) -> decide -> publish
when the rules say so -> append the history. One run at a time
(``<state>/trainer/train.lock``), whoever starts it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.errors import ConfigError, LabelloopError
from core.files import write_json_atomic
from core.settings import Settings
from serving.client import ModelInfo
from serving.publish import BuiltModel, build_model
from trainer.dataset import HOLDOUT_DIR, Dataset, build_dataset
from trainer.evaluate import EvalResult, evaluate
from trainer.history import HISTORY_FILE, HOLDOUT_SET, History, trainer_dir
from trainer.lock import training_lock
from trainer.publish import ServedModel, find_served, publish_candidate
from trainer.rules import Decision, Rules, decide
from trainer.source import ProjectSource, Source
from trainer.synthetic import CLASSES, write_dataset
from trainer.train import DEFAULT_MODEL_YAML, EpochCheckpoint, snapshot_weights, train_detector

__all__ = [
    "BootstrapReport",
    "RunOptions",
    "RunReport",
    "bootstrap",
    "judge",
    "run_training",
    "trainer_dir",
    "training_lock",
    "watch",
]

logger = logging.getLogger(__name__)

WATCH_STATE_FILE = "watch.json"
_WATCH_RETRY_S = 300.0
_ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})
_START_EVENT = "START_TRAINING"


@dataclass(frozen=True)
class RunOptions:
    """Per-run knobs on top of settings (the CLI flags)."""

    epochs: int
    imgsz: int
    batch: int
    device: str
    patience: int
    dry_run: bool = False
    if_needed: bool = False
    lr0: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def train_kwargs(self) -> dict[str, Any]:
        """The knobs ``train_detector`` takes."""
        return {
            "epochs": self.epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            "device": self.device,
            "patience": self.patience,
            "lr0": self.lr0,
            "overrides": self.overrides,
        }

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> RunOptions:
        base = {
            "epochs": settings.epochs,
            "imgsz": settings.imgsz,
            "batch": settings.batch,
            "device": settings.device,
            "patience": settings.patience,
        }
        return cls(**{**base, **{k: v for k, v in changes.items() if v is not None}})


@dataclass
class RunReport:
    """Everything one run saw and did; ``to_json`` is the ``labelloop train --json`` document."""

    run_id: str
    run_dir: Path
    dataset: Dataset
    served_version: int | None
    served_live: bool
    served: EvalResult | None
    decision: Decision
    candidate: EvalResult | None = None
    # The candidate as judged: its ONNX's precision and, for int8, the gate's numbers or why it was refused.
    candidate_precision: str | None = None
    candidate_quantization: dict[str, Any] = field(default_factory=dict)
    published_version: int | None = None
    now_served: int | None = None
    train_args: dict[str, Any] = field(default_factory=dict)
    trained: bool = False
    dry_run: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        deployed = None if self.served is None else {"version": self.served_version, **_metrics(self.served)}
        candidate = None
        if self.candidate is not None:
            candidate = {"version": self.published_version, **_candidate(self, self.candidate)}
        return {
            "dataset": self.dataset.to_dict(),
            "deployed": deployed,
            "candidate": candidate,
            "decision": self.decision.to_dict(),
            "published_version": self.published_version,
        }


def _metrics(result: EvalResult) -> dict[str, Any]:
    return {
        "map50": result.map50,
        "map50_95": result.map50_95,
        "precision": result.precision,
        "recall": result.recall,
        "per_class_ap50": dict(result.per_class_ap50),
    }


def _candidate(report: RunReport, candidate: EvalResult) -> dict[str, Any]:
    return {
        **_metrics(candidate),
        "precision": report.candidate_precision,
        "quantization": dict(report.candidate_quantization),
    }


def judge(
    history: History,
    served_version: int | None,
    served: EvalResult | None,
    candidate: EvalResult | None,
    rules: Rules,
) -> Decision:
    """Decide from the history as it was BEFORE this run (the seed read its own new record back)."""
    previous = history.previous_map50(served_version) if served_version is not None else None
    return decide(candidate, served, previous, rules)


def _record(history: History, report: RunReport, kind: str) -> None:
    history.append_run(
        kind,
        served_version=report.served_version,
        served=None if report.served is None else _metrics(report.served),
        candidate=None if report.candidate is None else _candidate(report, report.candidate),
        decision=report.decision,
        published_version=report.published_version,
        run_id=report.run_id,
        dataset_hash=report.dataset.hash,
        holdout_images=report.dataset.splits["test"].images,
        error=report.error,
    )


def _dry_trainer_dir(real: Path, scratch: Path) -> Path:
    """A throw-away copy of the trainer folder's held-out set, so a dry run changes nothing."""
    folder = scratch / "trainer"
    folder.mkdir(parents=True)
    if (real / HOLDOUT_DIR).is_dir():
        shutil.copytree(real / HOLDOUT_DIR, folder / HOLDOUT_DIR)
    return folder


def run_training(settings: Settings, source: Source, options: RunOptions) -> RunReport:
    """One run; see the module docstring. A failed publish is recorded, then raised."""
    folder = trainer_dir(settings)
    history = History(folder / HISTORY_FILE)
    rules = Rules.from_settings(settings)
    with training_lock(folder), tempfile.TemporaryDirectory(prefix="labelloop-train-") as scratch:
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        run_dir = (Path(scratch) if options.dry_run else folder) / "runs" / run_id
        served = find_served(settings)
        served_classes = tuple(served.card.classes) if served is not None else ()
        # Labels are mapped to the served model's classes, as the bridge maps them (core.labelmap).
        data = source.collect(settings, Path(scratch), served_classes)
        model_classes = served_classes or data.classes
        build_in = _dry_trainer_dir(folder, Path(scratch)) if options.dry_run else folder
        dataset = build_dataset(data.images, model_classes, build_in)
        logger.info("%s -> dataset %s", data.description, dataset.hash[:12])

        served_eval = _evaluate_served(served, dataset, run_dir, options)
        served_version = served.version if served is not None else None
        report = RunReport(
            run_id=run_id,
            run_dir=run_dir,
            dataset=dataset,
            served_version=served_version,
            served_live=served.live if served is not None else False,
            served=served_eval,
            decision=judge(history, served_version, served_eval, None, rules),
            now_served=served_version,
            dry_run=options.dry_run,
        )
        if options.dry_run:
            logger.info("dry run: no training, nothing published, no history written")
            return report
        if options.if_needed and not report.decision.retrain_needed:
            logger.info("the served model meets the rules; not training")
            _record(history, report, "evaluate")
            return report

        base = served.weights if served is not None else None
        if served is not None and base is None:
            logger.warning("version %d has no weights.pt; training from scratch", served.version)
        result = train_detector(
            dataset.data_yaml,
            run_dir / "train",
            base=base,
            model_yaml=DEFAULT_MODEL_YAML,
            **options.train_kwargs(),
        )
        report.trained = True
        report.train_args = {k: v for k, v in result.args.items() if k not in ("project", "name", "data")}
        try:
            # Judged as it would be served: the exported (and, with precision int8, quantized) ONNX.
            built = build_model(settings, result.best, options.imgsz, run_dir / "candidate", _images(dataset.root))
            report.candidate_precision, report.candidate_quantization = built.precision, dict(built.quantization)
            report.candidate = evaluate(
                built.onnx,
                dataset.data_yaml,
                options.imgsz,
                expected_classes=_held_out_classes(dataset),
                device=options.device,
                run_dir=run_dir / "eval-candidate",
            )
            report.decision = judge(history, served_version, served_eval, report.candidate, rules)
            if report.decision.deploy:
                version, info = publish_candidate(
                    settings,
                    built,
                    result.best,
                    imgsz=options.imgsz,
                    metrics={"set": HOLDOUT_SET, **_metrics(report.candidate)},
                    dataset_hash=dataset.hash,
                    parent_version=served_version,
                    classes=list(dataset.classes),
                    train_args=report.train_args,
                    note=f"labelloop train {run_id} from {data.description}",
                )
                report.published_version = version
                report.now_served = info.version if info is not None else served_version
        except LabelloopError as exc:
            report.error = str(exc)
            raise
        finally:
            _record(history, report, "train")
            (run_dir / "report.json").parent.mkdir(parents=True, exist_ok=True)
            (run_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        return report


def _evaluate_served(
    served: ServedModel | None, dataset: Dataset, run_dir: Path, options: RunOptions
) -> EvalResult | None:
    """The served version's own ONNX, at its own input size, on the held-out set."""
    if served is None:
        return None
    return evaluate(
        served.onnx,
        dataset.data_yaml,
        served.card.imgsz,
        expected_classes=_held_out_classes(dataset),
        device=options.device,
        run_dir=run_dir / "eval-served",
    )


def _images(dataset_root: Path) -> list[Path]:
    """A dataset's training images: what INT8 calibrates on (a model is never calibrated on held-out images)."""
    folder = dataset_root / "images" / "train"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _held_out_classes(dataset: Dataset) -> list[str]:
    """Classes with at least one box in the held-out set: the ones a fair score must cover."""
    return [name for name, boxes in dataset.splits["test"].boxes.items() if boxes > 0]


# --- bootstrap ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapReport:
    """The first model: where it came from, how good it is on held-out synthetic images, its version.

    ``version`` and ``metrics`` are the version served at the end; ``early_version`` is the one
    published while training went on, when there was one.
    """

    version: int
    served: bool
    metrics: EvalResult
    seconds: float
    train_args: dict[str, Any]
    precision: str = "fp32"
    quantization: dict[str, Any] = field(default_factory=dict)
    early_version: int | None = None
    early_epoch: int | None = None


BOOTSTRAP_PROGRESS = "progress.json"


@dataclass(frozen=True)
class _Early:
    """The version a bootstrap published while it went on training."""

    version: int
    epoch: int
    built: BuiltModel
    metrics: EvalResult


@dataclass
class _Bootstrap:
    """One bootstrap run: judge a checkpoint on the held-out images, publish it, record it, report progress."""

    settings: Settings
    options: RunOptions
    folder: Path  # <state>/trainer/bootstrap/runs/<time>
    progress_file: Path  # <state>/trainer/bootstrap/progress.json
    data_yaml: Path
    combined: Path
    dataset_hash: str
    test_images: int
    early_map50: float | None
    early: _Early | None = None
    _progress: dict[str, Any] = field(default_factory=dict)

    def progress(self, **fields: Any) -> None:
        """What ``labelloop up`` shows while it waits: the epoch, its validation mAP50, what was published."""
        self._progress.update(fields)
        write_json_atomic(self.progress_file, self._progress)

    def record(self, metrics: EvalResult, published_version: int | None, **extra: Any) -> None:
        """One line of the trainer's history for a judged checkpoint (published or not)."""
        History(trainer_dir(self.settings) / HISTORY_FILE).append(
            {
                "kind": "bootstrap",
                "set": "synthetic-held-out",
                "candidate": _metrics(metrics),
                "published_version": published_version,
                **extra,
            }
        )

    def judge(self, weights: Path, folder: Path) -> tuple[BuiltModel, EvalResult]:
        built = build_model(
            self.settings, weights, self.options.imgsz, folder / "candidate", _images(self.data_yaml.parent)
        )
        metrics = evaluate(
            built.onnx, self.combined, self.options.imgsz, device=self.options.device, run_dir=folder / "eval"
        )
        return built, metrics

    def publish(
        self,
        weights: Path,
        built: BuiltModel,
        metrics: EvalResult,
        train_args: dict[str, Any],
        *,
        note: str,
        record: dict[str, Any],
    ) -> tuple[int, ModelInfo | None]:
        version, info = publish_candidate(
            self.settings,
            built,
            weights,
            imgsz=self.options.imgsz,
            metrics={"set": "synthetic-held-out", "images": self.test_images, **_metrics(metrics)},
            dataset_hash=self.dataset_hash,
            parent_version=None if self.early is None else self.early.version,
            classes=list(CLASSES),
            train_args=train_args,
            note=note,
        )
        self.record(metrics, version, **record)
        self.progress(published_version=version)
        return version, info

    def on_checkpoint(self, point: EpochCheckpoint) -> None:
        """Publish the first good enough epoch at once, so pre-labels start while training goes on."""
        self.progress(epoch=point.epoch, epochs=point.epochs, val_map50=round(point.val_map50, 4))
        logger.info("epoch %d/%d: validation mAP50 %.3f", point.epoch, point.epochs, point.val_map50)
        wanted = self.early_map50 is not None and point.val_map50 >= self.early_map50
        if self.early is not None or not wanted or point.epoch >= point.epochs:
            return
        folder = self.folder / "early" / f"epoch{point.epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        rules = Rules.from_settings(self.settings)
        try:
            weights = snapshot_weights(point.weights, folder / "weights.pt")
            built, metrics = self.judge(weights, folder)
            if metrics.map50 < rules.retrain_below_map50:
                logger.info(
                    "epoch %d: held-out mAP50 %.3f is under %.2f: not published early",
                    point.epoch,
                    metrics.map50,
                    rules.retrain_below_map50,
                )
                return
            args = {**self.options.train_kwargs(), "epochs_trained": point.epoch}
            note = (
                f"labelloop bootstrap, published early: epoch {point.epoch} of {point.epochs} "
                "(training went on; the full model follows if it is better)"
            )
            version, _ = self.publish(weights, built, metrics, args, note=note, record={"epoch": point.epoch})
        except LabelloopError as exc:  # training goes on: the full model is published at the end
            logger.warning("epoch %d not published early: %s", point.epoch, exc)
            return
        self.early = _Early(version, point.epoch, built, metrics)
        logger.info("version %d published early (held-out mAP50 %.3f); training goes on", version, metrics.map50)


def bootstrap(
    settings: Settings,
    options: RunOptions,
    *,
    images: int = 240,
    test_images: int = 60,
    seed: int = 0,
    force: bool = False,
    early_map50: float | None = None,
) -> BootstrapReport:
    """Train the first detector from scratch on synthetic demo data and publish it (version 1).

    With ``early_map50``, the first epoch whose validation mAP50 reaches it, and whose held-out
    mAP50 clears the re-train threshold, is published at once: the stack pre-labels minutes sooner.
    The fully trained model then follows as the next version when the deploy rule says it is better.
    """
    from serving.repository import ModelRepository

    started = time.monotonic()
    repo = ModelRepository(settings.model_repository)
    existing = repo.versions(settings.model_name)
    if existing and not force:
        raise ConfigError(
            f"{settings.model_name} already has versions {existing} in {repo.root}; "
            "bootstrap makes the first one (--force publishes another)"
        )
    folder = trainer_dir(settings) / "bootstrap"
    with training_lock(trainer_dir(settings)):
        (folder / BOOTSTRAP_PROGRESS).unlink(missing_ok=True)  # a previous run's epochs are not this one's
        data_yaml = write_dataset(folder / "data", n=images, seed=seed)
        # held-out images come from another seed: never seen in training, same distribution
        held_out = write_dataset(folder / "held-out", n=test_images, seed=seed + 1).parent
        test = [str((held_out / "images" / split).resolve()) for split in ("train", "val")]
        combined = folder / "data.yaml"
        combined.write_text(data_yaml.read_text(encoding="utf-8") + f"test: {json.dumps(test)}\n", encoding="utf-8")

        run_dir = folder / "runs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        run = _Bootstrap(
            settings,
            options,
            run_dir,
            folder / BOOTSTRAP_PROGRESS,
            data_yaml,
            combined,
            f"synthetic:n={images},seed={seed}",
            test_images,
            early_map50,
        )
        run.progress(epoch=0, epochs=options.epochs)
        result = train_detector(
            combined,
            run_dir / "train",
            model_yaml=DEFAULT_MODEL_YAML,
            on_checkpoint=run.on_checkpoint,
            **options.train_kwargs(),
        )
        built, metrics = run.judge(result.best, run_dir)
        train_args = {k: v for k, v in result.args.items() if k not in ("project", "name", "data")}
        note = "labelloop bootstrap: trained from scratch on synthetic demo data"
        early = run.early
        if early is None:
            version, info = run.publish(result.best, built, metrics, train_args, note=note, record={})
            served = info is not None
        else:
            decision = decide(metrics, early.metrics, None, Rules.from_settings(settings))
            record = {"decision": decision.to_dict()}
            if decision.deploy:
                version, info = run.publish(result.best, built, metrics, train_args, note=note, record=record)
                served = info is not None
            else:
                logger.info("the fully trained model is not better than version %d by the deploy rule", early.version)
                run.record(metrics, None, **record)
                now = find_served(settings)
                version, built, metrics = early.version, early.built, early.metrics
                served = now is not None and now.live and now.version == early.version
        run.progress(done=True, published_version=version)
    return BootstrapReport(
        version,
        served,
        metrics,
        time.monotonic() - started,
        train_args,
        built.precision,
        dict(built.quantization),
        None if early is None else early.version,
        None if early is None else early.epoch,
    )


# --- watch -------------------------------------------------------------------------------------


@dataclass
class _WatchState:
    """The watcher's cursor into the bridge's event store, and what it has counted since each run."""

    after_id: int = 0
    pending: dict[int, int] = field(default_factory=dict)
    requested: set[int] = field(default_factory=set)
    retry_at: dict[int, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _WatchState:
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                after_id=int(data["after_id"]),
                pending={int(k): int(v) for k, v in data.get("pending", {}).items()},
                requested={int(p) for p in data.get("requested", [])},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); delete it to start from the first event") from exc

    def save(self, path: Path) -> None:
        data = {"after_id": self.after_id, "pending": self.pending, "requested": sorted(self.requested)}
        write_json_atomic(path, data)


def _due(state: _WatchState, every: int, now: float) -> list[int]:
    """Projects to train now: a START_TRAINING, or ``every`` annotation events since their last run."""
    wanted = state.requested | {p for p, n in state.pending.items() if n >= every}
    return sorted(p for p in wanted if state.retry_at.get(p, 0.0) <= now)


def _run_project(settings: Settings, project: int, options: RunOptions) -> int | None:
    """One run for a project: its session's head when it has one (its kind's trainer), else the detector."""
    from trainer.session_source import session_trainer

    found = session_trainer(settings, project)
    if found is not None:
        module, session = found
        return module.run(settings, project, session).published_version  # type: ignore[no-any-return]
    return run_training(settings, ProjectSource(project), options).published_version


def watch(
    settings: Settings,
    options: RunOptions,
    *,
    every: int,
    poll_s: float = 5.0,
    project: int | None = None,
    once: bool = False,
    stop: threading.Event | None = None,
    after_publish: Callable[[int], None] | None = None,
) -> int:
    """Follow the bridge's event store and run training when due; returns the number of runs started.

    ``project`` is used for events that name none. Runs happen here, in this process, never in
    the bridge; the training lock keeps them one at a time with ``labelloop train``.
    ``after_publish(project)`` runs after a run published a version (``trainer watch``: the queue
    refresh); its failure is logged, never fatal.
    """
    from core.events import ANNOTATION_ACTIONS, EventStore

    stop = stop or threading.Event()
    folder = trainer_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / WATCH_STATE_FILE
    state = _WatchState.load(state_path)
    store = EventStore.for_settings(settings)
    runs = 0
    logger.info("watching %s from event %d (train after %d annotations)", store.path, state.after_id, every)
    while True:
        for event in store.since(state.after_id, actions=ANNOTATION_ACTIONS):
            state.after_id = event.id
            target = event.project_id if event.project_id is not None else project
            if target is None:
                logger.warning("event %d (%s) names no project; pass --project", event.id, event.action)
            elif event.action == _START_EVENT:
                state.requested.add(target)
            elif event.action in _ANNOTATION_EVENTS:
                state.pending[target] = state.pending.get(target, 0) + 1
        state.save(state_path)
        for target in _due(state, every, time.monotonic()):
            runs += 1
            try:
                published = _run_project(settings, target, options)
            except LabelloopError as exc:
                logger.error("training project %d failed (retry in %.0fs): %s", target, _WATCH_RETRY_S, exc)
                state.retry_at[target] = time.monotonic() + _WATCH_RETRY_S
                continue
            state.requested.discard(target)
            state.pending.pop(target, None)
            state.retry_at.pop(target, None)
            state.save(state_path)
            logger.info("project %d: published %s", target, published if published is not None else "nothing")
            if published is not None and after_publish is not None:
                try:
                    after_publish(target)
                except Exception:  # noqa: BLE001 - the next runs must not depend on a refresh
                    logger.exception("project %d: the step after publishing failed", target)
        if once or stop.wait(poll_s):
            return runs
