"""The bridge process stays light: its peak RSS target (under 300 MB) leaves no room for model runtimes."""

from __future__ import annotations

import subprocess
import sys

# Model runtimes, and label-studio-sdk with the pandas it pulls (the bridge parses label configs itself).
HEAVY = ("cv2", "onnxruntime", "torch", "ultralytics", "label_studio_sdk", "pandas")


def test_the_bridge_imports_no_model_runtime() -> None:
    code = f"import sys, ls_bridge.app, ls_bridge.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
