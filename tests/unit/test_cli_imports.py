"""`labelloop --help` and `labelloop status` load no heavy package: each command imports what it runs.

The modules a run loaded are read from ``sys.modules`` in a fresh interpreter, not timed: a list of
names fails the same way on a fast box and a loaded one, and names what came in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

# Model runtimes, servers and clients that only some commands need, each a few hundred ms or more to import.
HEAVY = (
    "aiohttp",
    "cv2",
    "fastapi",
    "grpc",
    "httpx",
    "label_studio_sdk",
    "matplotlib",
    "numpy",
    "onnxruntime",
    "pandas",
    "PIL",
    "starlette",
    "torch",
    "transformers",
    "tritonclient",
    "ultralytics",
    "uvicorn",
)

_RUN = """
import json, sys
from labelloop.cli import app
try:
    app(sys.argv[1:], prog_name="labelloop")
except SystemExit:
    pass
print("\\n" + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def _loaded(args: list[str], tmp_path: Path) -> set[str]:
    """The top-level packages imported by ``labelloop ARGS`` (nothing of the stack running)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "LABELLOOP_STATE_DIR": str(tmp_path / "state"),
        "LABELLOOP_TRITON_URL": f"127.0.0.1:{free_port()}",
        "LABELLOOP_BRIDGE_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["bridge", "--help"], ["trainer", "--help"], ["backbone", "--help"]],
    ids=" ".join,
)
def test_help_imports_no_heavy_package(args: list[str], tmp_path: Path) -> None:
    loaded = _loaded(args, tmp_path)
    assert {"labelloop", "typer"} <= loaded, "the run itself is seen"
    assert sorted(loaded & set(HEAVY)) == []


def test_status_with_nothing_running_imports_no_heavy_package(tmp_path: Path) -> None:
    assert sorted(_loaded(["status"], tmp_path) & set(HEAVY)) == []
