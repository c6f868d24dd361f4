"""``python -m labelloop`` runs the CLI."""

from labelloop.cli import app

app(prog_name="labelloop")
