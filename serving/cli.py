"""``labelloop serve | export | models | detect``.

Imports stay light at module level (``labelloop --help`` loads this module): gRPC, numpy, the
Triton launcher and the repository load inside the commands that use them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError, RepositoryError
from core.settings import Settings, load_settings

if TYPE_CHECKING:
    from serving.client import ModelInfo
    from serving.repository import ModelRepository

__all__ = ["app"]

logger = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)

TritonUrl = Annotated[str | None, typer.Option("--triton-url", help="Triton gRPC host:port.")]
ModelName = Annotated[str | None, typer.Option("--model", help="Detector name in the repository.")]
RepoOpt = Annotated[Path | None, typer.Option("--model-repository", help="Model repository folder.")]


@app.command()
def serve(
    model_repository: RepoOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default 8001).")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port, with --http (default 8000).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Metrics port (default 8002).")] = None,
    http: Annotated[
        bool | None, typer.Option("--http/--no-http", help="Open Triton's HTTP/REST endpoint (default: closed).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A model that must be in the repository; listed first (default: none required)."),
    ] = None,
) -> None:
    """Run tritonserver in the foreground until Ctrl-C / SIGTERM, serving every model in the repository.

    Ready once each model's newest working version answers a real inference.
    """
    from serving.launcher import TritonProcess

    settings = load_settings(
        model_repository=model_repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        triton_http=http,
        model_name=model,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    process = TritonProcess(
        settings.model_repository,
        settings.state_dir,
        host=settings.host,
        grpc_port=settings.grpc_port,
        http_port=settings.http_port,
        metrics_port=settings.metrics_port,
        http=settings.triton_http,
    )
    try:
        process.start()
        process.wait_live(settings.triton_start_timeout_s)
        loaded = asyncio.run(_load(settings, process.grpc_url, required=model is not None))
        for kind, info in loaded:
            typer.echo(f"ready: {_describe(kind, info)} on {process.grpc_url}; log {process.log_file}")
        while not stop.wait(0.5):
            if process.poll() is not None:
                raise fail(RepositoryError(f"tritonserver exited (code {process.poll()}); see {process.log_file}"))
    except LabelloopError as exc:
        raise fail(exc) from exc
    finally:
        process.stop()


def _describe(kind: str, info: ModelInfo) -> str:
    """``defect_detector v3 (a, b; imgsz 320; CPUExecutionProvider)``; kinds without classes show the kind."""
    detail = f"{', '.join(info.classes)}; imgsz {info.imgsz[0]}" if info.classes else kind
    return f"{info.name} v{info.version} ({detail}; {info.provider})"


async def _load(settings: Settings, url: str, required: bool) -> list[tuple[str, ModelInfo]]:
    """Every model of the repository loaded, ``model_name`` first (and required to be there when asked for)."""
    from serving.control import load_repository
    from serving.repository import ModelRepository

    repo = ModelRepository(settings.model_repository)
    first = settings.model_name
    lead = first if required or first in repo.models() else None
    return await load_repository(url, repo, lead, timeout_s=settings.triton_timeout_s, retries=settings.triton_retries)


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="Ultralytics .pt weights (from our trainer or your path).")],
    imgsz: Annotated[int | None, typer.Option(help="Export image size (default 320).")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 (default) or int8: quantized for CPU boxes, needs --calibration.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Folder of images from the model's domain (searched recursively), for int8."),
    ] = None,
    model: ModelName = None,
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
    load: Annotated[
        bool | None, typer.Option("--load/--no-load", help="Load into Triton (default: if it is running).")
    ] = None,
) -> None:
    """Export weights to ONNX (INT8 with --precision int8) and publish them as the next model version."""
    from serving.publish import precision_summary, publish_weights
    from serving.repository import ModelCard, ModelRepository

    settings = load_settings(
        imgsz=imgsz, precision=precision, model_name=model, model_repository=model_repository, triton_url=triton_url
    )
    card = ModelCard(name=settings.model_name, version=0, classes=[], imgsz=settings.imgsz, note=f"export {weights}")
    try:
        if calibration is not None and settings.precision != "int8":
            raise ConfigError("--calibration is for --precision int8 (an fp32 export needs no images)")
        if calibration is not None and not calibration.is_dir():
            raise ConfigError(f"--calibration {calibration}: not a folder")
        images = sorted(p for p in calibration.rglob("*") if p.is_file()) if calibration is not None else []
        version, served = publish_weights(settings, weights, card, activate=load, images=images)
    except LabelloopError as exc:
        raise fail(exc) from exc
    where = f"served by Triton as v{served.version}" if served else "not loaded"
    published = ModelRepository(settings.model_repository).card(settings.model_name, version)
    precision = precision_summary(published.precision, published.quantization)
    typer.echo(f"published {settings.model_name} version {version}, {precision} ({where})")


@app.command("export-ensemble")
def export_ensemble(
    out: Annotated[Path, typer.Argument(help="Folder for the ensemble model repository (created).")],
    version: Annotated[int | None, typer.Option(help="Version to lay out (default: the latest).")] = None,
    gpu: Annotated[bool, typer.Option("--gpu/--cpu", help="Instances on GPU with TensorRT FP16.")] = True,
    core: Annotated[
        str,
        typer.Option(
            help="The ONNX step: 'onnxruntime' (NVIDIA's container), 'tensorrt' (Jetson: a plan built on the "
            "device), or 'python' (Triton without those backends)."
        ),
    ] = "onnxruntime",
    model: ModelName = None,
    model_repository: RepoOpt = None,
) -> None:
    """Write the onnxruntime variant (ensemble: python pre -> ONNX -> python post) of a version."""
    from dataclasses import replace

    from serving.publish import detector_config
    from serving.repository import ModelRepository
    from serving.variants import write_ensemble_repository

    settings = load_settings(model_name=model, model_repository=model_repository)
    cfg = replace(detector_config(settings), kind="KIND_GPU" if gpu else "KIND_CPU")
    try:
        written = write_ensemble_repository(ModelRepository(settings.model_repository), cfg, out, version, core)
    except LabelloopError as exc:
        raise fail(exc) from exc
    typer.echo(f"wrote {settings.model_name} version {written} as an ensemble into {out}")


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    model_repository: RepoOpt = None,
    triton_url: TritonUrl = None,
) -> None:
    """List every model version in the repository with its kind, and which one Triton serves."""
    from serving.repository import ModelRepository

    settings = load_settings(model_repository=model_repository, triton_url=triton_url)
    repo = ModelRepository(settings.model_repository)
    rows = asyncio.run(_model_rows(settings, repo))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models in {repo.root}")
    for row in rows:
        typer.echo(_model_line(row))


def _model_line(row: dict[str, Any]) -> str:
    """One text line of ``labelloop models``: served mark, name, version, kind, then what the kind has."""
    from core.kinds import KINDS

    mark = "*" if row["served"] else " "
    parts = [f"{mark} {row['name']} v{row['version']} {row['kind']}"]
    if row.get("arch"):
        parts.append(f"{row['arch']} patch {row['patch_size']} hidden {row['hidden_size']}")
    else:
        parts.append(f"{row['precision']} imgsz {row['imgsz']} {row['classes']}")
    entry = KINDS.get(row["kind"])
    metric = entry.metric if entry is not None else None
    value = row["metrics"].get(metric) if metric else None
    if isinstance(value, (int, float)):
        parts.append(f"{_METRIC_NAMES.get(metric or '', metric)} {value:.3f}")
    if row.get("note"):
        parts.append(f"({row['note']})")
    return " ".join(parts)


_METRIC_NAMES = {"map50": "mAP50", "macro_f1": "macro-F1", "miou": "mIoU"}


async def _served_versions(settings: Settings, names: list[str]) -> dict[str, list[int]]:
    """READY versions per model on the configured Triton; none when nothing answers there."""
    from serving.client import DetectorClient

    served: dict[str, list[int]] = {}
    for name in names:
        async with DetectorClient(settings.triton_url, name, timeout_s=5.0, retries=0) as client:
            if not await client.is_live():
                return {}
            served[name] = await client.ready_versions()
    return served


async def _model_rows(settings: Settings, repo: ModelRepository) -> list[dict[str, Any]]:
    names = repo.models()
    served = await _served_versions(settings, names)
    rows: list[dict[str, Any]] = []
    for name in names:
        for version in repo.versions(name):
            row: dict[str, Any] = {"name": name, "version": version}
            try:
                card = repo.card(name, version)
                row |= {"kind": card.kind, "imgsz": card.imgsz, "precision": card.precision}
                row |= {"classes": card.classes, "metrics": card.metrics, "note": card.note}
                if card.arch is not None:
                    row |= {"arch": card.arch, "patch_size": card.patch_size, "hidden_size": card.hidden_size}
                    row["num_register_tokens"] = card.num_register_tokens
            except RepositoryError as exc:
                row |= {"kind": repo.kind(name), "imgsz": None, "precision": None, "classes": []}
                row |= {"metrics": {"error": str(exc)}, "note": ""}
            row["served"] = version in served.get(name, [])
            row["onnx"] = str(repo.onnx_path(name, version).resolve())
            rows.append(row)
    return rows


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    triton_url: TritonUrl = None,
    model: ModelName = None,
    conf: Annotated[float | None, typer.Option(help="Score threshold (default 0.25).")] = None,
    iou: Annotated[float | None, typer.Option(help="NMS IoU threshold (default 0.7).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Detect defects in images through Triton; a bad image gets an error and the rest go on."""
    settings = load_settings(triton_url=triton_url, model_name=model, conf=conf, iou=iou)
    try:
        results = asyncio.run(_detect(settings, images))
    except LabelloopError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for row in results:
            if "error" in row:
                typer.echo(f"{row['image']}: error: {row['error']}")
                continue
            typer.echo(f"{row['image']}: {row['width']}x{row['height']} v{row['model_version']}")
            for d in row["detections"]:
                typer.echo(
                    f"  {d['label']:<14} {d['score']:.3f}  ({d['x1']:.1f}, {d['y1']:.1f}, {d['x2']:.1f}, {d['y2']:.1f})"
                )
    if any("error" in row for row in results):
        raise typer.Exit(code=2)


async def _detect(settings: Settings, images: list[Path]) -> list[dict[str, Any]]:
    from serving.client import ImageDetections, make_client

    async with make_client(settings) as client:
        await client.info()  # fail fast, once, when Triton is down rather than once per image
        blobs: list[bytes | None] = []
        for path in images:
            try:
                blobs.append(path.read_bytes())
            except OSError:
                blobs.append(None)
        todo = [b for b in blobs if b is not None]
        answers = iter(await client.detect_many(todo, conf=settings.conf, iou=settings.iou))
    rows: list[dict[str, Any]] = []
    for path, blob in zip(images, blobs, strict=True):
        row: dict[str, Any] = {"image": str(path)}
        result = next(answers) if blob is not None else None
        if blob is None:
            row["error"] = "cannot read file"
        elif isinstance(result, ImageDetections):
            row |= {
                "width": result.width,
                "height": result.height,
                "model_version": result.model_version,
                "detections": [
                    {"label": d.label, "score": d.score, "x1": d.x1, "y1": d.y1, "x2": d.x2, "y2": d.y2}
                    for d in result.detections
                ],
            }
        else:
            row["error"] = str(result)
        rows.append(row)
    return rows
