"""Export weights and publish them as the next model version: ``labelloop export`` as a script."""

from __future__ import annotations

import sys

from labelloop.cli import app

if __name__ == "__main__":
    app(args=["export", *sys.argv[1:]], prog_name="export_model.py")
