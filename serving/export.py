"""Export ultralytics weights to an ONNX file that Triton can serve.

The only serving module that imports ultralytics (the ``train`` extra); it is loaded lazily so
the serve side installs and runs without torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RepositoryError
from serving.triton.detector_ops import DetectorMeta, parse_onnx_metadata

__all__ = [
    "ONNX_IR_VERSION",
    "ONNX_OPSET",
    "ExportResult",
    "check_onnx",
    "configure_ultralytics_offline",
    "export_onnx",
    "save_for_triton",
]

logger = logging.getLogger(__name__)

# onnxruntime 1.19 (NVIDIA's Triton 24.10 container) loads IR <= 10 and opset <= 21;
# opset 17 is also what TensorRT 8.6+/10 parse without surprises.
ONNX_OPSET = 17
ONNX_IR_VERSION = 9


@dataclass(frozen=True)
class ExportResult:
    """An exported, checked ONNX file and what it says about itself."""

    onnx: Path
    meta: DetectorMeta


def configure_ultralytics_offline(settings_dir: Path) -> None:
    """Keep ultralytics from installing packages or phoning home (air-gapped sites, CI)."""
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(settings_dir))


def export_onnx(weights: Path, out: Path, imgsz: int, state_dir: Path) -> ExportResult:
    """Export ``weights`` (.pt) to ``out`` (dynamic batch, NMS outside the graph), then verify it.

    NMS stays out of the graph: ultralytics' in-graph NMS silently drops detections past the
    export batch size under dynamic batching, and Triton batches requests together.
    """
    if not weights.is_file():
        raise RepositoryError(f"no weights file at {weights}")
    configure_ultralytics_offline(state_dir / "ultralytics")
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="labelloop-export-") as tmp:
        local = Path(tmp) / weights.name
        shutil.copyfile(weights, local)  # ultralytics writes next to its input
        try:
            model = YOLO(str(local))
            produced = model.export(
                format="onnx", imgsz=imgsz, dynamic=True, simplify=False, opset=ONNX_OPSET, nms=False
            )
        except Exception as exc:  # noqa: BLE001 - ultralytics raises anything; report it as an export failure
            raise RepositoryError(f"ultralytics could not export {weights}: {exc}") from exc
        out.parent.mkdir(parents=True, exist_ok=True)
        save_for_triton(Path(produced), out)
    meta = check_onnx(out)
    logger.info("exported %s -> %s (classes=%s, imgsz=%s)", weights, out, list(meta.names), meta.imgsz)
    return ExportResult(onnx=out, meta=meta)


def save_for_triton(src: Path, dst: Path) -> None:
    """Save ``src`` at ``dst`` with an IR version the onnxruntime in NVIDIA's containers loads."""
    import onnx

    model = onnx.load(str(src))
    if model.ir_version > ONNX_IR_VERSION:
        model.ir_version = ONNX_IR_VERSION
    onnx.save(model, str(dst))


def check_onnx(path: Path) -> DetectorMeta:
    """``onnx.checker`` plus one onnxruntime run: a file that passes loads in Triton."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = parse_onnx_metadata(session.get_modelmeta().custom_metadata_map)
        feed: dict[str, Any] = {session.get_inputs()[0].name: np.zeros((1, 3, *meta.imgsz), np.float32)}
        (out,) = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many types; all mean "unusable"
        raise RepositoryError(f"{path} is not a usable detector ONNX: {exc}") from exc
    if out.ndim != 3 or out.shape[1] != 4 + len(meta.names):
        raise RepositoryError(f"{path}: output shape {out.shape} is not [B, 4+{len(meta.names)}, anchors]")
    return meta
