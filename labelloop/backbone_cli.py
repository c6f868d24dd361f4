"""``labelloop backbone import | demo | embed``: the DINOv3 feature backbone.

torch and transformers load only inside ``import`` and ``demo``; ``embed`` runs on the serve side.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from core.console import fail
from core.errors import ConfigError, LabelloopError

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="DINOv3 feature backbone: import real weights, the demo, features.")

NameOpt = Annotated[str | None, typer.Option("--name", help="Backbone name in the model repository (default dinov3).")]
RepoOpt = Annotated[Path | None, typer.Option("--model-repository", help="Model repository folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the card summary as JSON.")]


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    note = f" ({summary['note']})" if summary.get("note") else ""
    typer.echo(
        f"{summary['name']} v{summary['version']}: {summary['arch']}, patch {summary['patch_size']}, "
        f"hidden {summary['hidden_size']}, {summary['num_register_tokens']} registers{note}"
    )


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="Hugging Face DINOv3 folder (config.json + model.safetensors) or .pth.")],
    name: NameOpt = None,
    arch: Annotated[
        str | None, typer.Option(help="Meta checkpoints: dinov3_vits16, ... (default: from the file name).")
    ] = None,
    model_repository: RepoOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import real DINOv3 weights (offline), export them to ONNX, check and publish the next version."""
    from core.settings import load_settings
    from serving.backbone import DEFAULT_BACKBONE, card_summary
    from trainer.backbone import import_backbone

    try:
        settings = load_settings(model_repository=model_repository)
        card = import_backbone(settings, path, name or DEFAULT_BACKBONE, arch)
    except LabelloopError as exc:
        raise fail(exc) from exc
    _report(card_summary(card), as_json)


@app.command()
def demo(name: NameOpt = None, model_repository: RepoOpt = None, as_json: JsonOpt = False) -> None:
    """Publish the small random-initialised demo backbone (no weights from anywhere; for tests and demos)."""
    from core.settings import load_settings
    from serving.backbone import DEFAULT_BACKBONE, card_summary
    from trainer.backbone import publish_demo

    try:
        settings = load_settings(model_repository=model_repository)
        card = publish_demo(settings, name or DEFAULT_BACKBONE)
    except LabelloopError as exc:
        raise fail(exc) from exc
    _report(card_summary(card), as_json)


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .npz.")],
    backbone: Annotated[str | None, typer.Option("--backbone", help="Backbone name (default dinov3).")] = None,
    long_side: Annotated[
        int, typer.Option("--long-side", help="Resize the long side to this (multiple of the patch).")
    ] = 448,
    triton_url: Annotated[str | None, typer.Option("--triton-url", help="Triton gRPC host:port.")] = None,
    model_repository: RepoOpt = None,
) -> None:
    """Patch tokens of images through Triton, as served: tokens_i (h, w, C), grid_i (h, w), size_i (w, h).

    Without a Triton at the configured address, one is started over the model repository for this command.
    """
    import numpy as np

    from core.settings import load_settings
    from serving.backbone import DEFAULT_BACKBONE, embed_files

    name = backbone or DEFAULT_BACKBONE
    try:
        settings = load_settings(model_repository=model_repository, triton_url=triton_url)
        if long_side < 1:
            raise ConfigError(f"--long-side {long_side}: must be positive")
        results = asyncio.run(embed_files(settings, name, images, long_side))
    except LabelloopError as exc:
        raise fail(exc) from exc
    arrays: dict[str, Any] = {}
    failed = 0
    notes = set()
    for i, (path, result) in enumerate(zip(images, results, strict=True)):
        if isinstance(result, LabelloopError):
            failed += 1
            typer.echo(f"{path}: error: {result}", err=True)
            continue
        arrays[f"tokens_{i}"] = result.tokens
        arrays[f"grid_{i}"] = np.array(result.grid, np.int64)
        arrays[f"size_{i}"] = np.array(result.size, np.int64)
        notes.add(result.model.note)
        h, w = result.grid
        typer.echo(f"{path}: {w * h} tokens ({h}x{w}, {result.tokens.shape[-1]}-d) from {name} v{result.model.version}")
    arrays["backbone"] = np.array(json.dumps({"name": name, "notes": sorted(n for n in notes if n)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    for note in sorted(n for n in notes if n):
        typer.echo(f"note: {name} is a {note}: its features carry no learned meaning", err=True)
    if failed:
        raise typer.Exit(code=2)
