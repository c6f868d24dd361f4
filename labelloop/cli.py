"""The ``labelloop`` command: one Typer app that gathers each package's commands.

The command modules import their heavy parts (FastAPI, tritonclient, numpy, ultralytics, ...) inside
the commands, so ``--help`` and ``status`` load none of them (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from core.console import fail
from core.errors import LabelloopError
from labelloop import backbone_cli, bench, session_cli, stack
from ls_bridge import cli as bridge_cli
from serving import cli as serving_cli
from trainer import cli as trainer_cli

__all__ = ["app", "run"]

app = typer.Typer(
    name="labelloop",
    help="Pre-labels for Label Studio from Triton-served detectors, and a model that learns from them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(help="Logging level for progress on stderr.")] = "INFO",
) -> None:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # One line per HTTP request drowns the progress that matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def config(
    reference: Annotated[bool, typer.Option("--reference", help="Print every setting as a markdown table.")] = False,
) -> None:
    """Print the effective settings (secrets masked), or the configuration reference."""
    from core.settings import load_settings, reference_markdown

    if reference:
        typer.echo(reference_markdown(), nl=False)
        return
    try:
        settings = load_settings()
    except LabelloopError as exc:
        raise fail(exc) from exc
    # SecretStr fields dump as "**********": tokens never reach the terminal.
    for name, value in settings.model_dump(mode="json").items():
        typer.echo(f"{name}: {value}")


for group in (serving_cli.app, trainer_cli.app, bridge_cli.app, stack.app, bench.app):
    for command in group.registered_commands:
        app.registered_commands.append(command)
app.add_typer(trainer_cli.group, name="trainer", help="Long-running trainer service.")
app.add_typer(backbone_cli.app, name="backbone", help="DINOv3 feature backbone: import, demo, embed.")
app.add_typer(session_cli.app, name="session", help="Labelling sessions: a Label Studio project per session YAML.")


def run() -> None:
    """The console entry point: an expected failure anywhere (settings included) is one line, exit code 1."""
    try:
        app(prog_name="labelloop")
    except LabelloopError as exc:
        raise SystemExit(fail(exc).exit_code) from exc
