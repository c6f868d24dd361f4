"""What can be checked of the deployment files here: compose structure, Dockerfiles, generated configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serving.pbtxt import DetectorConfig
from serving.repository import ModelCard, ModelRepository
from serving.variants import CORE_BACKENDS, write_ensemble_repository

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_file_serves_the_gpu_variant_on_loopback() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    triton, bridge = compose["services"]["triton"], compose["services"]["bridge"]
    assert (DEPLOY / triton["build"]["dockerfile"]).is_file()
    assert (DEPLOY / bridge["build"]["context"] / bridge["build"]["dockerfile"]).resolve().is_file()
    assert "--model-control-mode=explicit" in triton["command"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for service in (triton, bridge):
        assert all(str(p).startswith("127.0.0.1:") for p in service["ports"])
    assert bridge["environment"]["LABELLOOP_TRITON_URL"] == "triton:8001"
    assert "LABEL_STUDIO_API_KEY" in bridge["environment"]


def test_dockerfiles_copy_what_exists() -> None:
    text = (DEPLOY / "bridge.Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (DEPLOY.parent / src).exists(), src


@pytest.mark.parametrize("core", CORE_BACKENDS)
def test_every_core_backend_writes_configs_triton_can_parse(core: str, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "src")
    repo.write_config(DetectorConfig())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not parsed here")
    repo.add_version(ModelCard(name="defect_detector", version=0, classes=["a"], imgsz=256), onnx)
    out = tmp_path / "out"
    version = write_ensemble_repository(repo, DetectorConfig(kind="KIND_GPU"), out, core_backend=core)
    assert version == 1
    configs = {}
    for folder in out.iterdir():
        configs[folder.name] = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert (folder / "1").is_dir()
    core_cfg = configs["defect_detector_onnx"]
    expected = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "python": ""}[core]
    assert core_cfg.platform == expected
    assert core_cfg.input[0].dims == [3, 256, 256]  # imgsz comes from the version's card
    assert (out / "defect_detector_onnx" / "1" / "model.onnx").is_file()


def test_unknown_core_backend_is_refused(tmp_path: Path) -> None:
    from core.errors import RepositoryError

    repo = ModelRepository(tmp_path / "src")
    repo.write_config(DetectorConfig())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    repo.add_version(ModelCard(name="defect_detector", version=0, classes=["a"], imgsz=256), onnx)
    with pytest.raises(RepositoryError, match="unknown core backend"):
        write_ensemble_repository(repo, DetectorConfig(), tmp_path / "out", core_backend="tflite")


def test_an_int8_version_laid_out_for_a_gpu_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = ModelRepository(tmp_path / "src")
    repo.write_config(DetectorConfig())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    for precision in ("fp32", "int8"):
        card = ModelCard(name="defect_detector", version=0, classes=["a"], imgsz=256, precision=precision)
        repo.add_version(card, onnx)
    for version, kind in ((1, "KIND_GPU"), (2, "KIND_CPU")):
        write_ensemble_repository(repo, DetectorConfig(kind=kind), tmp_path / f"out{version}", version)
    assert not caplog.records
    write_ensemble_repository(repo, DetectorConfig(kind="KIND_GPU"), tmp_path / "out3", 2)
    assert "version 2 is INT8" in caplog.text
