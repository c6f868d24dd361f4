"""How every command reports an expected failure: one line on stderr, exit code 1."""

from __future__ import annotations

import typer

from core.errors import LabelloopError

__all__ = ["fail"]


def fail(exc: LabelloopError) -> typer.Exit:
    """Print ``error: <message>`` to stderr and return the exit to raise (``raise fail(exc) from exc``)."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=1)
