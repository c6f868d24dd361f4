"""``labelloop demo-data | bootstrap | train | promote | rollback`` and ``labelloop trainer watch``.

Results go to stdout (a table, or one JSON document with ``--json``); progress, ultralytics'
included, goes to stderr. Each command imports what it runs (ultralytics, the pipeline) when it
runs, so ``labelloop --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError

if TYPE_CHECKING:
    from core.settings import Settings
    from trainer.evaluate import EvalResult
    from trainer.pipeline import RunReport

__all__ = ["app", "group"]

logger = logging.getLogger(__name__)

# A whole project pre-labelled by the new version: Label Studio's own "Retrieve predictions" gets 100 s.
_QUEUE_TIMEOUT_S = 1800

app = typer.Typer(no_args_is_help=True)
group = typer.Typer(no_args_is_help=True, help="Long-running trainer services.")
app.add_typer(group, name="trainer")

# Calibrated on the 2-core reference box: mAP50 >= 0.9 on held-out synthetic images within 10 minutes.
BOOTSTRAP_EPOCHS = 15
BOOTSTRAP_BATCH = 8

Epochs = Annotated[int | None, typer.Option(help="Training epochs (default: settings, 30).")]
Imgsz = Annotated[int | None, typer.Option(help="Training and export image size (default 320).")]
Batch = Annotated[int | None, typer.Option(help="Batch size (default 16).")]
Device = Annotated[str | None, typer.Option(help="'cpu', '0', ... (default: a GPU when present).")]
Patience = Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (default 50).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
RepoOpt = Annotated[Path | None, typer.Option("--model-repository", help="Model repository folder.")]
TritonUrl = Annotated[str | None, typer.Option("--triton-url", help="Triton gRPC host:port.")]


class _Stderr:
    """A stream that writes to whatever ``sys.stderr`` is now (pytest and CliRunner swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr, name)


@contextlib.contextmanager
def _progress_on_stderr() -> Iterator[None]:
    """Keep stdout for results: ultralytics logs to a handler made on stdout, and its bars use stdout."""
    stream = _Stderr()
    for handler in logging.getLogger("ultralytics").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(stream)
    with contextlib.redirect_stdout(stream):
        yield


def _settings(**flags: Any) -> Settings:
    from core.settings import load_settings

    try:
        return load_settings(**flags)
    except LabelloopError as exc:
        raise fail(exc) from exc


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the dataset (created).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 240,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    kind: Annotated[
        str,
        typer.Option(help="detector (YOLO boxes), classifier (images per class) or segmenter (blobs and masks)."),
    ] = "detector",
) -> None:
    """Write a seeded synthetic dataset: defects in YOLO format, surface classes, or blob defects with masks."""
    from trainer.synthetic import write_dataset
    from trainer.synthetic_blobs import write_segmenter_dataset
    from trainer.synthetic_classes import write_classifier_dataset

    writers: dict[str, Callable[..., Path]] = {
        "detector": write_dataset,
        "classifier": write_classifier_dataset,
        "segmenter": write_segmenter_dataset,
    }
    if kind not in writers:
        raise fail(ConfigError(f"no demo data for kind {kind!r}; kinds with demo data: {', '.join(writers)}"))
    try:
        written = writers[kind](out, n=n, seed=seed)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(str(written))


@app.command("bootstrap")
def bootstrap_command(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = BOOTSTRAP_EPOCHS,
    images: Annotated[int, typer.Option(help="Synthetic training images (80% train, 20% val).")] = 240,
    test_images: Annotated[int, typer.Option(help="Synthetic held-out images for the reported mAP50.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    batch: Annotated[
        int, typer.Option(help="Batch size (small: more optimizer steps on few images).")
    ] = BOOTSTRAP_BATCH,
    imgsz: Imgsz = None,
    device: Device = None,
    force: Annotated[bool, typer.Option(help="Publish even if the model already has versions.")] = False,
    early_map50: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Publish the first epoch whose validation mAP50 reaches this at once, and go on training; "
            "the full model follows if it is better (what `labelloop up` does).",
        ),
    ] = None,
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
    as_json: AsJson = False,
) -> None:
    """Train the first model from scratch on synthetic demo data and publish it as version 1."""
    from serving.publish import precision_summary
    from trainer.pipeline import RunOptions, bootstrap

    settings = _settings(
        imgsz=imgsz, batch=batch, device=device, model_repository=model_repository, triton_url=triton_url
    )
    options = RunOptions.from_settings(settings, epochs=epochs)
    try:
        with _progress_on_stderr():
            report = bootstrap(
                settings,
                options,
                images=images,
                test_images=test_images,
                seed=seed,
                force=force,
                early_map50=early_map50,
            )
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        document = {
            "published_version": report.version,
            "early_version": report.early_version,
            "early_epoch": report.early_epoch,
            "served": report.served,
            "seconds": round(report.seconds, 1),
            "held_out": report.metrics.to_dict(),
            "train_args": report.train_args,
            "precision": report.precision,
            "quantization": report.quantization,
        }
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo(_metrics_table([("synthetic held-out", report.metrics)]))
    if report.early_version is not None:
        typer.echo(f"version {report.early_version} was published early, after epoch {report.early_epoch}")
    where = "served by Triton" if report.served else "Triton not running: served at its next start"
    precision = precision_summary(report.precision, report.quantization)
    typer.echo(
        f"published {settings.model_name} version {report.version}, {precision} ({where}) in {report.seconds:.0f}s"
    )
    if report.metrics.map50 < 0.9:
        typer.echo(f"warning: mAP50 {report.metrics.map50:.3f} is below the 0.9 target; try more --epochs", err=True)


@app.command("train")
def train_command(
    action: Annotated[
        str | None,
        typer.Argument(
            help="'stop': end the project's running head training at its next suspension, keeping its best."
        ),
    ] = None,
    project: Annotated[
        int | None,
        typer.Option(
            help="Label Studio project id (API path): at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, "
            "else the Label Studio `labelloop up` runs."
        ),
    ] = None,
    export: Annotated[Path | None, typer.Option(help="Label Studio YOLO export: zip or folder.")] = None,
    images: Annotated[Path | None, typer.Option(help="Folder with the export's images.")] = None,
    epochs: Epochs = None,
    imgsz: Imgsz = None,
    batch: Batch = None,
    device: Device = None,
    patience: Patience = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the dataset and evaluate the served model; train nothing.")
    ] = False,
    if_needed: Annotated[bool, typer.Option("--if-needed", help="Train only when the re-train rules fire.")] = False,
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
    as_json: AsJson = False,
) -> None:
    """Rebuild the dataset, evaluate the served model, fine-tune, decide by the rules, publish if better.

    A project with a labelling session (``labelloop session create``), or whose label config only has
    controls a head fills, trains that session's head instead: its kind says how.
    """
    from trainer.pipeline import RunOptions, run_training
    from trainer.source import ExportSource, ProjectSource, Source

    if action not in (None, "stop"):
        raise fail(ConfigError(f"unknown action {action!r}: the only one is 'stop'"))
    if project is not None and export is None:
        settings = _settings(model_repository=model_repository, triton_url=triton_url)
        if _train_session(settings, project, stop=action == "stop", as_json=as_json):
            return
    if action == "stop":
        raise fail(ConfigError("`train stop` needs --project ID of a labelling session"))
    source: Source
    if project is not None and export is None:
        source = ProjectSource(project)
    elif export is not None and project is None:
        source = ExportSource(export, images)
    else:
        raise fail(ConfigError("give exactly one of --project ID or --export PATH (with --images DIR)"))
    settings = _settings(
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        patience=patience,
        model_repository=model_repository,
        triton_url=triton_url,
    )
    options = RunOptions.from_settings(settings, dry_run=dry_run, if_needed=if_needed)
    try:
        with _progress_on_stderr():
            report = run_training(settings, source, options)
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(_run_text(report))


def _train_session(settings: Settings, project: int, *, stop: bool, as_json: bool) -> bool:
    """Train (or stop) the project's session head through its kind's ``session_run``; False: not a session."""
    from trainer.session_source import session_trainer

    try:
        found = session_trainer(settings, project)
        if found is None:
            return False
        module, session = found
        if stop:
            path = module.request_stop(settings, session.model_name)
            typer.echo(f"stop requested ({path}): the run ends at its next suspension")
            return True
        report = module.run(settings, project, session)
    except LabelloopError as exc:
        raise fail(exc) from exc
    document = report.to_json()
    typer.echo(json.dumps(document, indent=2) if as_json else module.summary(document))
    return True


@app.command("promote")
def promote_command(
    version: Annotated[int, typer.Argument(help="The version to serve.")],
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
) -> None:
    """Serve VERSION again: its artefacts are re-published as a new version (nothing is rewritten)."""
    from trainer.publish import promote

    settings = _settings(model_repository=model_repository, triton_url=triton_url)
    try:
        new, info = promote(settings, version)
    except LabelloopError as exc:
        raise fail(exc) from exc
    if new == version:
        typer.echo(f"version {version} is already served")
    else:
        typer.echo(f"published v{new} as a copy of v{version} ({_served_text(info)})")


@app.command("rollback")
def rollback_command(
    to: Annotated[int | None, typer.Option(help="Version to go back to (default: the one before).")] = None,
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
) -> None:
    """Re-publish the previous version's artefacts as a NEW version; history is never rewritten."""
    from trainer.publish import rollback

    settings = _settings(model_repository=model_repository, triton_url=triton_url)
    try:
        new, source, info = rollback(settings, to)
    except LabelloopError as exc:
        raise fail(exc) from exc
    typer.echo(f"rolled back: v{new} re-publishes v{source} ({_served_text(info)})")


@group.command("watch")
def watch_command(
    every: Annotated[int | None, typer.Option(help="Train after this many new annotation events (default 50).")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the event store.")] = 5.0,
    project: Annotated[int | None, typer.Option(help="Project for events that name none.")] = None,
    once: Annotated[bool, typer.Option(help="Look once, run what is due, and exit.")] = False,
    epochs: Epochs = None,
    imgsz: Imgsz = None,
    batch: Batch = None,
    device: Device = None,
) -> None:
    """Train on the bridge's stored webhook events: START_TRAINING, or every N annotations (Ctrl-C stops)."""
    from trainer.pipeline import RunOptions, watch

    settings = _settings(train_every_annotations=every, epochs=epochs, imgsz=imgsz, batch=batch, device=device)
    stop = threading.Event()
    if not once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        with _progress_on_stderr():
            runs = watch(
                settings,
                RunOptions.from_settings(settings),
                every=settings.train_every_annotations,
                poll_s=poll,
                project=project,
                once=once,
                stop=stop,
                after_publish=_refresh_queue,
            )
    except LabelloopError as exc:
        raise fail(exc) from exc
    typer.echo(f"watch stopped after {runs} training runs")


def _refresh_queue(project: int) -> None:
    """After a publish: ``labelloop queue --project`` pre-labels with the new version and re-sorts the tab.

    Run as its own process: the queue is the bridge's code, which the trainer does not import.
    """
    command = [sys.executable, "-m", "labelloop", "queue", "--project", str(project)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=_QUEUE_TIMEOUT_S, check=False)
    if done.returncode != 0:
        logger.warning("project %d: the queue was not refreshed: %s", project, done.stderr.strip()[-500:])
    else:
        logger.info("project %d: queue refreshed (%s)", project, done.stdout.strip().splitlines()[0])


def _served_text(info: Any) -> str:
    return f"Triton serves v{info.version}" if info is not None else "Triton not running: served at its next start"


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _metrics_table(columns: list[tuple[str, EvalResult | None]]) -> str:
    """mAP50, mAP50-95, P, R and per-class AP50, one column per model."""
    classes: list[str] = []
    for _, result in columns:
        if result is not None:
            classes.extend(c for c in result.per_class_ap50 if c not in classes)
    rows: list[tuple[str, list[str]]] = [
        ("mAP50", [_fmt(r.map50 if r else None) for _, r in columns]),
        ("mAP50-95", [_fmt(r.map50_95 if r else None) for _, r in columns]),
        ("precision", [_fmt(r.precision if r else None) for _, r in columns]),
        ("recall", [_fmt(r.recall if r else None) for _, r in columns]),
    ]
    rows += [(f"AP50 {c}", [_fmt(r.per_class_ap50.get(c) if r else None) for _, r in columns]) for c in classes]
    width = max(20, *(len(name) + 2 for name, _ in columns))
    lines = [f"{'':<22}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    lines += [f"{label:<22}" + "".join(f"{cell:>{width}}" for cell in cells) for label, cells in rows]
    return "\n".join(lines)


def _run_text(report: RunReport) -> str:
    """The human summary of a run: dataset, both evaluations, and every number behind the decision."""
    from serving.publish import precision_summary
    from trainer.dataset import summary_table

    d = report.decision
    rules = d.rules
    served_name = f"served v{report.served_version}" if report.served_version is not None else "served (none)"
    if report.served_version is not None and not report.served_live:
        served_name += " (Triton down)"
    where = "dry run: nothing kept" if report.dry_run else str(report.dataset.root)
    lines = [
        f"dataset {report.dataset.hash[:12]} ({where}); held-out images: "
        f"{report.dataset.splits['test'].images} (+{report.dataset.holdout_added} new)",
        summary_table(report.dataset),
        "",
        _metrics_table([(served_name, report.served), ("candidate", report.candidate)]),
        "",
        f"rule: re-train when served mAP50 < {rules.retrain_below_map50:.4f}  -> served {_fmt(d.served_map50)}",
        f"rule: re-train when served ΔmAP50 < {rules.retrain_delta_map50:+.4f}  -> previous "
        f"{_fmt(d.previous_served_map50)}, Δ {_fmt(d.delta_map50, sign=True)}",
        f"rule: deploy when candidate mAP50 > served + {rules.deploy_margin_map50:.4f}  -> candidate "
        f"{_fmt(d.candidate_map50)}, margin {_fmt(d.margin_map50, sign=True)}",
        f"re-train needed: {'yes' if d.retrain_needed else 'no'}; deploy: {'yes' if d.deploy else 'no'}",
        *(f"  - {reason}" for reason in d.reasons),
    ]
    if report.candidate_precision is not None:
        precision = precision_summary(report.candidate_precision, report.candidate_quantization)
        lines.append(f"candidate judged as {precision}")
    if report.published_version is not None:
        served = report.now_served == report.published_version
        where = "Triton serves it" if served else "Triton not running: served at its next start"
        lines.append(f"published version {report.published_version} ({where})")
    elif report.trained:
        lines.append(f"not deployed: version {report.served_version} stays served")
    return "\n".join(lines)
