"""One training run of a session head, whatever its kind: annotations -> features -> head -> judged -> published.

1. The session's annotations (the kind's ``collect``), split with a frozen held-out set.
2. Features from the session's backbone, in-process, cached on disk: only new images are embedded.
3. The served head (Triton's, else the repository's newest) and the candidate are judged on the
   same held-out features through their ONNX, as Triton runs them, with the kind's metrics.
4. The candidate warm-starts from the served head when classes and token width are the same;
   otherwise it trains from scratch and the report says why.
5. Every ``prediction_interval`` epochs the run suspends: it saves a checkpoint, stores interim
   predictions for the next unlabelled tasks (least sure first) under ``<model>@v<N+1>-candidate``,
   and honours ``labelloop train stop`` (the ``STOP`` file), ending with the best weights so far.
6. The deploy rule on the kind's metric, with the session's thresholds; a deploy publishes version
   N+1 atomically and activates it in Triton, where a failure leaves the served version untouched.

What differs between kinds is a :class:`HeadOps` (``trainer.classifier_run``, ``trainer.segmenter_run``).
Each session's head keeps its files in ``<state_dir>/trainer/heads/<model>/``: the held-out
manifest, ``history.jsonl``, the run folders and the ``STOP`` file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt
import torch

from core.errors import ConfigError, LabelloopError, PublishError, RepositoryError
from core.session import DEMO_BACKBONE, Session
from core.settings import Settings
from core.studio import StudioClient, model_version_name, studio_settings
from serving.backbone import DEFAULT_BACKBONE, FeaturesClient
from serving.control import activate_version, load_served_version
from serving.heads import ClassifierClient, publish_head
from serving.repository import WEIGHTS_FILE, ModelCard, ModelRepository
from trainer.choices_data import ClassifiedImage, Collected, Split, split_holdout
from trainer.classify import HeadParams
from trainer.features import LocalBackbone
from trainer.history import HOLDOUT_SET, History, trainer_dir
from trainer.lock import training_lock
from trainer.rules import MetricDecision, decide_metric

__all__ = [
    "STOP_FILE",
    "HeadOps",
    "HeadRunReport",
    "backbone_name",
    "ensure_backbone",
    "head_dir",
    "request_stop",
    "run_head",
]

logger = logging.getLogger(__name__)

STOP_FILE = "STOP"
Tokens = npt.NDArray[Any]


class Checkpoint(Protocol):
    classes: tuple[str, ...]
    hidden: int

    def save(self, path: Path) -> Path: ...

    def to_head(self) -> Any: ...


class HeadOps(Protocol):
    """What one head kind does in a run; the rest is :func:`run_head`."""

    @property
    def kind(self) -> str: ...

    async def collect(self, settings: Settings, project: int, session: Session) -> Collected: ...

    def labels(self, collected: Collected, images: Sequence[ClassifiedImage], tokens: Sequence[Tokens]) -> Any:
        """What the head learns from and is judged against, for these images and their token grids."""

    def metric(self, held: Any) -> str:
        """The deploy rule's metric for this held-out set."""

    def judge(self, onnx: Path, tokens: Sequence[Tokens], held: Any, head_classes: Sequence[str]) -> dict[str, Any]:
        """The metrics of a head's ONNX on the held-out features, as Triton runs it."""

    def load_checkpoint(self, path: Path) -> Checkpoint: ...

    def train(
        self,
        tokens: Sequence[Tokens],
        labels: Any,
        params: HeadParams,
        warm: Checkpoint | None,
        on_epoch: Callable[[int, float, Any], bool],
    ) -> tuple[Any, int]:
        """The trained head (best weights) and the epochs run."""

    def checkpoint(self, head: Any) -> Checkpoint: ...

    def export(self, head: Any, path: Path) -> Path: ...

    def interim(self, head: Any, collected: Collected, tokens: Sequence[Tokens], version: str) -> list[dict[str, Any]]:
        """Label Studio predictions of the pending tasks by a head in training."""

    def config(self, settings: Settings, backbone: str) -> Any:
        """The head's Triton config (``serving.pbtxt``), with a ``render()``."""


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
    """What one head run saw and did; ``to_json`` is the ``labelloop train --json`` document."""

    kind: str
    run_id: str
    model: str
    split: Split
    metric: str
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
            "kind": self.kind,
            "model": self.model,
            "metric": self.metric,
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
            "metrics": self.candidate,
            "decision": self.decision.to_dict(),
            "published_version": self.published_version,
            "timings_s": self.timings,
        }


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


def _served(settings: Settings, model: str, kind: str) -> _Served | None:
    """The head Triton serves now, else the repository's newest; None before the first one."""
    repo = ModelRepository(settings.model_repository)
    version = asyncio.run(_triton_version(settings, model)) or repo.latest(model)
    if version is None:
        return None
    card = repo.card(model, version)
    if card.kind != kind:
        raise RepositoryError(f"{model!r} in {repo.root} is a {card.kind}, not a {kind}: rename the session")
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


def _warm(ops: HeadOps, served: _Served | None, classes: tuple[str, ...], hidden: int) -> tuple[Checkpoint | None, str]:
    """The served head's checkpoint to start from, or None and why not."""
    if served is None or served.weights is None:
        return None, "none: no served head"
    checkpoint = ops.load_checkpoint(served.weights)
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


def _params(session: Session) -> HeadParams:
    spec = session.training
    return HeadParams(
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        max_epochs=spec.max_epochs,
        patience=spec.early_stop_patience,
        min_delta=spec.min_delta,
        batch_size=spec.batch_size,
    )


def run_head(ops: HeadOps, settings: Settings, project_id: int, session: Session) -> HeadRunReport:
    """One run for a session head; see the module docstring. A failed publish is recorded, then raised."""
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
        collected = asyncio.run(ops.collect(settings, project_id, session))
        split = split_holdout(collected.images, folder, session.training.holdout_fraction)
        timings["collect_s"] = round(time.perf_counter() - started, 2)
        backbone = LocalBackbone.from_settings(settings, ensure_backbone(settings, session))
        mark = time.perf_counter()
        train_x = [backbone.features(i.data, session.long_side) for i in split.train]
        held_x = [backbone.features(i.data, session.long_side) for i in split.holdout]
        pending_x = [backbone.features(i.data, session.long_side) for i in collected.pending]
        timings["embed_s"] = round(time.perf_counter() - mark, 2)
        logger.info("features: %d computed, the rest from the cache", backbone.computed)
        held = ops.labels(collected, split.holdout, held_x)
        metric = ops.metric(held)

        served = _served(settings, model, ops.kind)
        served_metrics = None
        if served is not None:
            if served.card.backbone != backbone.name or served.card.backbone_version != backbone.version:
                logger.warning("served %s v%d runs on other features: not judged", model, served.version)
            else:
                served_metrics = ops.judge(served.onnx, held_x, held, served.card.classes)
        served_version = served.version if served is not None else None
        thresholds = (session.rule.retrain_below, session.rule.retrain_delta, session.rule.deploy_margin)
        previous = history.previous_metric(served_version, metric) if served_version is not None else None
        served_value = served_metrics[metric] if served_metrics else None
        report = HeadRunReport(
            kind=ops.kind,
            run_id=run_id,
            model=model,
            split=split,
            metric=metric,
            served_version=served_version,
            served=served_metrics,
            decision=decide_metric(metric, None, served_value, previous, thresholds),
            timings=timings,
        )
        warm, report.warm_start = _warm(ops, served, classes, int(train_x[0].shape[-1]))
        try:
            mark = time.perf_counter()
            interim = _Interim(
                ops,
                settings,
                project_id,
                collected,
                pending_x,
                model_version_name(model, (served_version or 0) + 1) + "-candidate",
            )
            labels = ops.labels(collected, split.train, train_x)
            head = _train(ops, session, folder, run_dir, report, train_x, labels, warm, interim)
            timings["train_s"] = round(time.perf_counter() - mark, 2)
            onnx = ops.export(head, run_dir / "model.onnx")
            ops.checkpoint(head).save(run_dir / WEIGHTS_FILE)
            report.candidate = ops.judge(onnx, held_x, held, classes)
            report.decision = decide_metric(metric, report.candidate[metric], served_value, previous, thresholds)
            if report.decision.deploy:
                report.published_version = _publish(
                    ops, settings, session, backbone, onnx, run_dir / WEIGHTS_FILE, report, served_version
                )
        except LabelloopError as exc:
            report.error = str(exc)
            raise
        finally:
            timings["total_s"] = round(time.perf_counter() - started, 2)
            history.append_run(
                ops.kind,
                served_version=served_version,
                served=None if served_metrics is None else {metric: served_value, "metrics": served_metrics},
                candidate=None if report.candidate is None else {metric: report.candidate[metric]},
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

    ops: HeadOps
    settings: Settings
    project: int
    collected: Collected
    tokens: list[Tokens]
    version: str
    written: int = 0

    def write(self, head: Any) -> None:
        if not self.tokens:
            return
        rows = self.ops.interim(head, self.collected, self.tokens, self.version)
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
    ops: HeadOps,
    session: Session,
    folder: Path,
    run_dir: Path,
    report: HeadRunReport,
    tokens: Sequence[Tokens],
    labels: Any,
    warm: Checkpoint | None,
    interim: _Interim,
) -> Any:
    interval = session.training.prediction_interval

    def on_epoch(epoch: int, loss: float, head: Any) -> bool:
        report.epochs = epoch
        if epoch % interval:
            return True
        logger.info("epoch %d: loss %.4f (suspension: checkpoint, interim predictions, stop check)", epoch, loss)
        ops.checkpoint(head).save(run_dir / "checkpoint.pt")
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
        head, report.epochs = ops.train(tokens, labels, _params(session), warm, on_epoch)
    finally:
        torch.set_num_threads(threads)
    report.interim_writes = interim.written
    return head


def _publish(
    ops: HeadOps,
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
        kind=ops.kind,
        parent_version=parent,
        metrics={"set": HOLDOUT_SET, **(report.candidate or {})},
        dataset_hash=report.split.dataset_hash,
        train_args={"epochs": report.epochs, "warm_start": report.warm_start, **session.training.model_dump()},
        note=f"labelloop train {report.run_id} from Label Studio project {session.project}"
        + (f" ({backbone.card.note})" if backbone.card.note else ""),
        backbone=backbone.name,
        backbone_version=backbone.version,
    )
    try:
        version = publish_head(repo, card, onnx, ops.config(settings, backbone.name), weights)
    except LabelloopError as exc:
        raise PublishError(f"could not publish {session.model_name}: {exc}; the served version is unchanged") from exc
    asyncio.run(_activate(settings, repo, session.model_name, backbone.name, version))
    return version
