"""Lay out the ensemble (``onnxruntime``) variant of a published version.

The default repository serves one python-backend model. For NVIDIA's Triton container the same
ONNX runs on the ``onnxruntime_onnx`` backend (TensorRT FP16 on GPUs) between python pre- and
post-processing steps; clients see the same model name, inputs and outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from core.errors import RepositoryError
from serving.pbtxt import DetectorConfig, render_core_onnx, render_ensemble, render_stage
from serving.repository import CARD_FILE, ONNX_FILE, ModelRepository, runtime_files

__all__ = ["CORE_BACKENDS", "write_ensemble_repository"]

logger = logging.getLogger(__name__)

CORE_BACKENDS = ("onnxruntime", "python", "tensorrt")


def _write_model(out: Path, model: str, config: str, version: int, files: dict[str, bytes]) -> None:
    """Write one model folder (config + version N) through a staging folder and a rename."""
    staging = out / f".staging-{uuid.uuid4().hex}"
    (staging / str(version)).mkdir(parents=True)
    (staging / "config.pbtxt").write_text(config)
    for name, data in files.items():
        (staging / str(version) / name).write_bytes(data)
    target = out / model
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)


def write_ensemble_repository(
    source: ModelRepository,
    cfg: DetectorConfig,
    out: Path,
    version: int | None = None,
    core_backend: str = "onnxruntime",
) -> int:
    """Write ``cfg.name`` (ensemble) and its three steps for ``version`` (default: latest) into ``out``."""
    version = version or source.latest(cfg.name)
    if version is None or version not in source.versions(cfg.name):
        raise RepositoryError(f"{cfg.name} has no version {version} in {source.root}")
    card = source.card(cfg.name, version)
    if card.precision == "int8" and cfg.kind == "KIND_GPU":
        logger.warning(
            "%s version %d is INT8 (QDQ), made for onnxruntime on a CPU; for a GPU publish an fp32 version "
            "and let TensorRT build its own engine",
            cfg.name,
            version,
        )
    cfg = DetectorConfig(**{**cfg.__dict__, "imgsz": card.imgsz})
    code = runtime_files()
    card_bytes = (source.version_dir(cfg.name, version) / CARD_FILE).read_bytes()
    onnx = source.onnx_path(cfg.name, version).read_bytes()
    out.mkdir(parents=True, exist_ok=True)

    if core_backend not in CORE_BACKENDS:
        raise RepositoryError(f"unknown core backend {core_backend!r}; one of {', '.join(CORE_BACKENDS)}")
    # tensorrt: the ONNX is the input of trtexec, which writes model.plan beside it on the device.
    core_files = {ONNX_FILE: onnx, **(code if core_backend == "python" else {})}
    _write_model(out, f"{cfg.name}_onnx", render_core_onnx(cfg, core_backend), version, core_files)
    for stage in ("preprocess", "postprocess"):
        _write_model(out, f"{cfg.name}_{stage}", render_stage(cfg, stage), version, {**code, CARD_FILE: card_bytes})
    _write_model(out, cfg.name, render_ensemble(cfg), version, {})
    return version
