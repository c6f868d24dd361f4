"""``labelloop demo-data`` (and, later, the trainer commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer.synthetic import write_dataset

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the YOLO dataset (created).")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 240,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
) -> None:
    """Write a seeded synthetic defect dataset (dentado, concave, perforation) in YOLO format."""
    try:
        data_yaml = write_dataset(out, n=n, seed=seed)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(str(data_yaml))
