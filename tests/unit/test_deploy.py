"""What can be checked of the deployment files here: compose structure, Dockerfiles, generated configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from pydantic import AliasChoices
from tritonclient.grpc import model_config_pb2

from core.settings import Settings
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


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--"))


def test_tritons_http_endpoint_stays_inside_its_container() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    triton = compose["services"]["triton"]
    flags = _flags(triton["command"])
    # HTTP on the container's own loopback (the health check runs inside it): not published, not on the network.
    assert flags["http-address"] == "127.0.0.1"
    assert "localhost:8000" in " ".join(triton["healthcheck"]["test"])
    # Metrics default to the HTTP address: named explicitly, or the published metrics port would be dead.
    assert flags["metrics-address"] == flags["grpc-address"] == "0.0.0.0"
    assert sorted(int(p.rsplit(":", 1)[1]) for p in triton["ports"]) == [8001, 8002]


def test_the_bridge_container_asks_for_basic_auth() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    env = compose["services"]["bridge"]["environment"]
    assert env["BASIC_AUTH_PASS"].startswith("${BASIC_AUTH_PASS:?"), "compose must refuse to start without it"
    assert env["BASIC_AUTH_USER"]
    assert env.get("LABELLOOP_BRIDGE_AUTH", "basic") == "basic"


def test_compose_sets_only_settings_that_exist() -> None:
    known = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        known |= {str(c) for c in alias.choices} if isinstance(alias, AliasChoices) else {f"LABELLOOP_{name.upper()}"}
    compose = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    env = compose["services"]["bridge"]["environment"]
    assert {k for k in env if k.startswith("LABELLOOP_")} <= known
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"} <= known


def test_dockerfiles_copy_what_exists() -> None:
    text = (DEPLOY / "bridge.Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (DEPLOY.parent / src).exists(), src
                copied.add(src)
    # Every package the install needs: a missing one installs fine and fails at the first import.
    find = re.search(
        r"\[tool\.setuptools\.packages\.find\]\s*include = \[([^\]]*)\]", (DEPLOY.parent / "pyproject.toml").read_text()
    )
    assert find is not None
    packages = {p.strip().strip('"').rstrip("*") for p in find.group(1).split(",")}
    assert "core" in packages
    assert packages <= copied


def test_the_bridge_image_installs_only_the_bridge_extra_which_has_no_model_runtime() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower() for requirement in extras["bridge"]}
    runtimes = {"torch", "onnxruntime", "onnxruntime-gpu", "opencv-python", "nvidia-pytriton", "ultralytics"}
    assert not names & (runtimes | {"label-studio-sdk", "transformers"})
    installs = [line for line in (DEPLOY / "bridge.Dockerfile").read_text().splitlines() if "pip install" in line]
    assert installs == ['RUN pip install --no-cache-dir ".[bridge]"']


def test_the_bridge_image_runs_unprivileged_with_a_writable_state_folder() -> None:
    lines = [line.strip() for line in (DEPLOY / "bridge.Dockerfile").read_text().splitlines()]
    user = lines.index("USER nobody")
    assert any("chown nobody /state" in line for line in lines[:user])
    assert "ENV LABELLOOP_STATE_DIR=/state" in lines


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
