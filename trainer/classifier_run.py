"""One classifier training run: annotations -> features -> head -> judged against the served head -> published.

1. The session's Choices annotations (:mod:`trainer.choices_data`), split with a frozen held-out set.
2. Features from the session's backbone, in-process, cached on disk: only new images are embedded.
3. The served head (Triton's, else the repository's newest) and the candidate are judged on the
   same held-out features through their ONNX, as Triton runs them: accuracy, macro-F1, per-class
   F1 and the confusion matrix.
4. The candidate warm-starts from the served head when the classes are the same; with another
   class list it trains from scratch and the report says why.
5. Every ``prediction_interval`` epochs the run suspends: it saves a checkpoint and honours
   ``labelloop train stop`` (the ``STOP`` file), ending with the best weights so far.
6. The deploy rule on macro-F1, with the session's thresholds; a deploy publishes version N+1
   atomically and activates it in Triton, where a failure leaves the served version untouched.

Each session's head keeps its files in ``<state_dir>/trainer/heads/<model>/``: the held-out
manifest, ``history.jsonl``, the run folders and the ``STOP`` file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from core.errors import ConfigError, LabelloopError, PublishError, RepositoryError
from core.session import DEMO_BACKBONE, Session
from core.settings import Settings
from core.studio import StudioClient, model_version_name, studio_settings
from core.uncertainty import margin
from serving.backbone import DEFAULT_BACKBONE, FeaturesClient
from serving.control import activate_version, load_served_version
from serving.heads import ClassifierClient, publish_classifier
from serving.pbtxt import ClassifierConfig
from serving.repository import WEIGHTS_FILE, ModelCard, ModelRepository
from trainer.choices_data import ClassifiedImage, Collected, Split, collect_choices, split_holdout
from trainer.classify import (
    ClassifierHead,
    HeadCheckpoint,
    HeadParams,
    classification_metrics,
    export_head_onnx,
    predict_proba,
    train_head,
)
from trainer.features import LocalBackbone
from trainer.history import HOLDOUT_SET, History, trainer_dir
from trainer.lock import training_lock
from trainer.rules import MetricDecision, decide_metric

__all__ = ["METRIC", "HeadRunReport", "backbone_name", "head_dir", "request_stop", "run_classifier"]

logger = logging.getLogger(__name__)

METRIC = "macro_f1"
STOP_FILE = "STOP"
KIND = "classifier"


def head_dir(settings: Settings, model: str) -> Path:
    """The folder of one session head's trainer files."""
    return trainer_dir(settings) / "heads" / model


def request_stop(settings: Settings, model: str) -> Path:
    """Ask a running training of ``model`` to end at its next suspension (``labelloop train stop``)."""
    path = head_dir(settings, model) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(datetime.now(timezone.utc).isoformat(timespec="seconds") + "\n")
    return path


def backbone_name(session: Session) -> str:
    """The repository name of the session's backbone (``demo``: the default name, see :func:`ensure_backbone`)."""
    return DEFAULT_BACKBONE if session.backbone == DEMO_BACKBONE else session.backbone


def ensure_backbone(settings: Settings, session: Session) -> str:
    """The session's backbone name; ``demo`` publishes the random-init demo backbone when none is there."""
    name = backbone_name(session)
    repo = ModelRepository(settings.model_repository)
    if repo.latest(name) is None:
        if session.backbone != DEMO_BACKBONE:
            raise ConfigError(
                f"backbone {name!r} is not in {repo.root}: `labelloop backbone import PATH --name {name}`, "
                "or `backbone: demo` in the session"
            )
        from trainer.backbone import publish_demo

        logger.warning("no backbone %r yet: publishing the random-init demo backbone (no learned features)", name)
        publish_demo(settings, name)
    return name


@dataclass
class HeadRunReport:
    """What one classifier run saw and did; ``to_json`` is the ``labelloop train --json`` document."""

    run_id: str
    model: str
    split: Split
    served_version: int | None
    served: dict[str, Any] | None
    decision: MetricDecision
    candidate: dict[str, Any] | None = None
    published_version: int | None = None
    epochs: int = 0
    stopped: str | None = None
    warm_start: str = "none"
    interim_writes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "model": self.model,
            "dataset": self.split.to_dict(),
            "deployed": None if self.served is None else {"version": self.served_version, "metrics": self.served},
            "candidate": None
            if self.candidate is None
            else {
                "metrics": self.candidate,
                "epochs": self.epochs,
                "stopped": self.stopped,
                "warm_start": self.warm_start,
                "interim_predictions": self.interim_writes,
            },
            "decision": self.decision.to_dict(),
            "published_version": self.published_version,
            "timings_s": self.timings,
        }


Tokens = npt.NDArray[Any]


def _features(backbone: LocalBackbone, images: Sequence[ClassifiedImage], long_side: int) -> list[Tokens]:
    return [backbone.features(image.data, long_side) for image in images]


def onnx_predictions(onnx: Path, tokens: Sequence[Tokens]) -> npt.NDArray[np.float32]:
    """Class probabilities of a head's ONNX over feature grids, one image at a time as Triton runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    rows = [np.asarray(session.run(None, {"tokens": t[None].astype(np.float32)})[0][0]) for t in tokens]
    probs: npt.NDArray[np.float32] = np.stack(rows).astype(np.float32)
    return probs


def _judge(
    onnx: Path, tokens: Sequence[Tokens], truth: Sequence[int], classes: Sequence[str], head_classes: Sequence[str]
) -> dict[str, Any]:
    """Metrics over the session's ``classes`` of a head whose outputs are ``head_classes`` (matched by name)."""
    index = {name: k for k, name in enumerate(classes)}
    predicted = [index.get(head_classes[int(p)], len(classes)) for p in onnx_predictions(onnx, tokens).argmax(axis=1)]
    if max(predicted) < len(classes):
        return classification_metrics(list(truth), predicted, classes)
    # The head answered a class the session no longer has: a wrong answer, in a column of its own.
    return classification_metrics(list(truth), predicted, [*classes, "(not a session class)"])


@dataclass(frozen=True)
class _Served:
    version: int
    card: ModelCard
    onnx: Path
    weights: Path | None


async def _triton_version(settings: Settings, model: str) -> int | None:
    async with ClassifierClient(settings.triton_url, model, timeout_s=5.0, retries=0) as client:
        if not await client.is_live():
            return None
        try:
            ready = await client.ready_versions()
        except LabelloopError:
            return None
        return ready[-1] if ready else None


def _served(settings: Settings, model: str) -> _Served | None:
    """The head Triton serves now, else the repository's newest; None before the first one."""
    repo = ModelRepository(settings.model_repository)
    version = asyncio.run(_triton_version(settings, model)) or repo.latest(model)
    if version is None:
        return None
    card = repo.card(model, version)
    if card.kind != KIND:
        raise RepositoryError(f"{model!r} in {repo.root} is a {card.kind}, not a classifier: rename the session")
    return _Served(version, card, repo.onnx_path(model, version), repo.weights_path(model, version))


async def _activate(settings: Settings, repo: ModelRepository, model: str, backbone: str, version: int) -> int | None:
    """Serve ``version`` if Triton runs (loading the backbone first when it is not loaded); None when it does not."""
    async with ClassifierClient(settings.triton_url, model, timeout_s=settings.triton_timeout_s) as client:
        if not await client.is_live():
            logger.info("Triton is not running; %s version %d is served at its next start", model, version)
            return None
        async with FeaturesClient(settings.triton_url, backbone, timeout_s=settings.triton_timeout_s) as features:
            if not await features.ready_versions():
                await load_served_version(features, repo)
        return (await activate_version(client, repo, version)).version


def _warm(served: _Served | None, classes: tuple[str, ...], hidden: int) -> tuple[HeadCheckpoint | None, str]:
    """The served head's checkpoint to start from, or None and why not."""
    if served is None or served.weights is None:
        return None, "none: no served head"
    checkpoint = HeadCheckpoint.load(served.weights)
    why = None
    if checkpoint.hidden != hidden:
        why = f"refused: the served head v{served.version} reads {checkpoint.hidden}-d tokens, these are {hidden}-d"
    elif tuple(checkpoint.classes) != classes:
        why = (
            f"refused: the served head v{served.version} has classes [{', '.join(checkpoint.classes)}], "
            f"the session [{', '.join(classes)}]; training from scratch"
        )
    if why is not None:
        logger.warning("warm start %s", why)
        return None, why
    return checkpoint, f"from served v{served.version}"


def run_classifier(settings: Settings, project_id: int, session: Session) -> HeadRunReport:
    """One run for a classifier session; see the module docstring. A failed publish is recorded, then raised."""
    model = session.model_name
    folder = head_dir(settings, model)
    classes = session.class_names
    history = History(folder / "history.jsonl")
    with training_lock(folder):
        (folder / STOP_FILE).unlink(missing_ok=True)
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        run_dir = folder / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        collected = asyncio.run(collect_choices(settings, project_id, classes, session.training.interim_tasks))
        split = split_holdout(collected.images, folder, session.training.holdout_fraction)
        timings["collect_s"] = round(time.perf_counter() - started, 2)
        backbone = LocalBackbone.from_settings(settings, ensure_backbone(settings, session))
        mark = time.perf_counter()
        train_x = _features(backbone, split.train, session.long_side)
        held_x = _features(backbone, split.holdout, session.long_side)
        timings["embed_s"] = round(time.perf_counter() - mark, 2)
        logger.info("features: %d computed, the rest from the cache", backbone.computed)
        index = {name: k for k, name in enumerate(classes)}
        held_y = [index[i.label] for i in split.holdout]

        served = _served(settings, model)
        served_metrics = None
        if served is not None:
            if served.card.backbone != backbone.name or served.card.backbone_version != backbone.version:
                logger.warning("served %s v%d runs on other features: not judged", model, served.version)
            else:
                served_metrics = _judge(served.onnx, held_x, held_y, classes, served.card.classes)
        served_version = served.version if served is not None else None
        thresholds = (session.rule.retrain_below, session.rule.retrain_delta, session.rule.deploy_margin)
        previous = history.previous_metric(served_version, METRIC) if served_version is not None else None
        served_value = served_metrics[METRIC] if served_metrics else None
        report = HeadRunReport(
            run_id=run_id,
            model=model,
            split=split,
            served_version=served_version,
            served=served_metrics,
            decision=decide_metric(METRIC, None, served_value, previous, thresholds),
            timings=timings,
        )
        warm, report.warm_start = _warm(served, classes, int(train_x[0].shape[-1]))
        try:
            mark = time.perf_counter()
            interim = _Interim(
                settings,
                project_id,
                collected,
                _features(backbone, collected.pending, session.long_side),
                model_version_name(model, (served_version or 0) + 1) + "-candidate",
                classes,
            )
            train_y = [index[i.label] for i in split.train]
            checkpoint = _train(session, folder, run_dir, report, train_x, train_y, warm, interim)
            timings["train_s"] = round(time.perf_counter() - mark, 2)
            onnx = export_head_onnx(checkpoint.to_head(), run_dir / "model.onnx")
            checkpoint.save(run_dir / WEIGHTS_FILE)
            report.candidate = _judge(onnx, held_x, held_y, classes, classes)
            report.decision = decide_metric(METRIC, report.candidate[METRIC], served_value, previous, thresholds)
            if report.decision.deploy:
                report.published_version = _publish(
                    settings, session, backbone, onnx, run_dir / WEIGHTS_FILE, report, served_version
                )
        except LabelloopError as exc:
            report.error = str(exc)
            raise
        finally:
            timings["total_s"] = round(time.perf_counter() - started, 2)
            history.append_run(
                KIND,
                served_version=served_version,
                served=None if served_metrics is None else {METRIC: served_value, "metrics": served_metrics},
                candidate=None if report.candidate is None else {METRIC: report.candidate[METRIC]},
                decision=report.decision,
                published_version=report.published_version,
                run_id=run_id,
                dataset_hash=split.dataset_hash,
                error=report.error,
            )
        return report


@dataclass
class _Interim:
    """Interim predictions at each suspension: the next unlabelled tasks, most uncertain first, in Label Studio.

    They are stored under the candidate's own ``model_version`` (``<model>@v<N+1>-candidate``), each
    suspension's replacing the last, so an annotator sees where the head is heading while it trains.
    """

    settings: Settings
    project: int
    collected: Collected
    tokens: list[Tokens]
    version: str
    classes: tuple[str, ...]
    written: int = 0

    def write(self, head: ClassifierHead) -> None:
        if not self.tokens:
            return
        probs = predict_proba(head, self.tokens)
        rows = []
        for image, row in zip(self.collected.pending, probs, strict=True):
            best = int(np.argmax(row))
            label = self.collected.to_label.get(self.classes[best], self.classes[best])
            result = {
                "from_name": self.collected.control,
                "to_name": self.collected.to_name,
                "type": "choices",
                "value": {"choices": [label]},
                "score": float(row[best]),
            }
            rows.append(
                {"task": image.task_id, "model_version": self.version, "score": margin(row), "result": [result]}
            )
        try:
            asyncio.run(self._store(rows))
        except LabelloopError as exc:
            logger.warning("interim predictions not stored (training goes on): %s", exc)
            return
        self.written += 1
        logger.info("interim predictions for %d tasks stored as %s", len(rows), self.version)

    async def _store(self, rows: list[dict[str, Any]]) -> None:
        studio = studio_settings(self.settings, "storing interim predictions")
        async with StudioClient.from_settings(studio) as client:
            await client.replace_predictions(self.project, self.version, rows)


def _train(
    session: Session,
    folder: Path,
    run_dir: Path,
    report: HeadRunReport,
    tokens: Sequence[Tokens],
    labels: Sequence[int],
    warm: HeadCheckpoint | None,
    interim: _Interim,
) -> HeadCheckpoint:
    spec = session.training
    params = HeadParams(
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        max_epochs=spec.max_epochs,
        patience=spec.early_stop_patience,
        min_delta=spec.min_delta,
        batch_size=spec.batch_size,
    )

    def on_epoch(epoch: int, loss: float, head: ClassifierHead) -> bool:
        report.epochs = epoch
        if epoch % spec.prediction_interval:
            return True
        logger.info("epoch %d: loss %.4f (suspension: checkpoint, interim predictions, stop check)", epoch, loss)
        HeadCheckpoint.from_head(head, session.class_names).save(run_dir / "checkpoint.pt")
        interim.write(head)
        if (folder / STOP_FILE).exists():
            report.stopped = f"labelloop train stop, at epoch {epoch}"
            logger.warning("stop requested: ending the run at epoch %d with the best weights so far", epoch)
            return False
        return True

    # One thread: the head is small, and beside Triton and Label Studio two threads fight for the cores
    # (measured 12-14 s against 89-92 s for one training under load). The process's setting comes back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_head(tokens, labels, session.class_names, params, warm=warm, on_epoch=on_epoch)
    finally:
        torch.set_num_threads(threads)
    report.epochs = result.epochs
    report.interim_writes = interim.written
    return HeadCheckpoint.from_head(result.head, session.class_names)


def _publish(
    settings: Settings,
    session: Session,
    backbone: LocalBackbone,
    onnx: Path,
    weights: Path,
    report: HeadRunReport,
    parent: int | None,
) -> int:
    repo = ModelRepository(settings.model_repository)
    card = ModelCard(
        name=session.model_name,
        version=0,
        classes=list(session.class_names),
        imgsz=session.long_side,
        kind=KIND,
        parent_version=parent,
        metrics={"set": HOLDOUT_SET, **(report.candidate or {})},
        dataset_hash=report.split.dataset_hash,
        train_args={"epochs": report.epochs, "warm_start": report.warm_start, **session.training.model_dump()},
        note=f"labelloop train {report.run_id} from Label Studio project {session.project}"
        + (f" ({backbone.card.note})" if backbone.card.note else ""),
        backbone=backbone.name,
        backbone_version=backbone.version,
    )
    config = ClassifierConfig(
        name=session.model_name,
        backbone=backbone.name,
        classes=session.class_names,
        intra_op_threads=max(1, settings.ort_threads),
    )
    try:
        version = publish_classifier(repo, card, onnx, config, weights)
    except LabelloopError as exc:
        raise PublishError(f"could not publish {session.model_name}: {exc}; the served version is unchanged") from exc
    asyncio.run(_activate(settings, repo, session.model_name, backbone.name, version))
    return version


run = run_classifier


def summary(document: dict[str, Any]) -> str:
    """The human summary of a run document: dataset, both evaluations, the decision and what was published."""
    decision = document["decision"]
    lines = [f"classifier {document['model']}: dataset {json.dumps(document['dataset'])}"]
    for name, entry in (("served", document["deployed"]), ("candidate", document["candidate"])):
        if entry is None:
            lines.append(f"{name}: none")
            continue
        metrics = entry["metrics"]
        lines.append(
            f"{name}{' v' + str(entry['version']) if 'version' in entry else ''}: accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}, per class {json.dumps(metrics['per_class_f1'])}"
        )
    lines += [f"  - {reason}" for reason in decision["reasons"]]
    published = document["published_version"]
    lines.append(f"published version {published}" if published is not None else "nothing published")
    return "\n".join(lines)
