"""Settings precedence: defaults < YAML < env < flags, and the Label Studio aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import CONFIG_ENV, load_settings


def test_defaults() -> None:
    s = load_settings()
    assert s.triton_url == "127.0.0.1:8001"
    assert s.model_name == "defect_detector"
    assert s.bridge_host == "127.0.0.1" and s.host == "127.0.0.1"


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model_name: from_yaml\nconf: 0.4\niou: 0.5\n")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    monkeypatch.setenv("LABELLOOP_CONF", "0.3")
    s = load_settings(iou=None)
    assert (s.model_name, s.conf, s.iou) == ("from_yaml", 0.3, 0.5)
    assert load_settings(conf=0.1).conf == 0.1


def test_label_studio_names_and_prefixed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-token")
    monkeypatch.setenv("LABELLOOP_ALLOWED_ORIGINS", "https://a.example, http://B.example:9000")
    s = load_settings()
    assert s.label_studio_url == "http://ls:8080"
    assert s.label_studio_api_key is not None and s.label_studio_api_key.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(s)
    assert s.allowed_origins == ["https://a.example:443", "http://b.example:9000"]
    monkeypatch.setenv("LABELLOOP_LABEL_STUDIO_URL", "http://other:8080")
    assert load_settings().label_studio_url == "http://other:8080"
    assert load_settings(label_studio_url="http://flag:1").label_studio_url == "http://flag:1"


def test_bad_values_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="conf"):
        load_settings(conf=2.0)
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md's table is generated: `labelloop config --reference` prints it."""
    from core.settings import reference_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page


def test_an_unknown_yaml_key_names_the_nearest_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("imgsz: 320\nconff: 0.4\n")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    with pytest.raises(ConfigError, match=r"unknown setting 'conff'; did you mean 'conf'\?"):
        load_settings()


def test_an_unknown_environment_variable_names_the_nearest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELLOOP_TRITON_UR", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"LABELLOOP_TRITON_UR .*did you mean 'triton_url'\?"):
        load_settings()
    monkeypatch.delenv("LABELLOOP_TRITON_UR")
    monkeypatch.setenv("LABELLOOP_ZZZ_NOTHING_LIKE_IT", "1")
    with pytest.raises(ConfigError, match="unknown setting LABELLOOP_ZZZ_NOTHING_LIKE_IT in the environment$"):
        load_settings()


def test_an_unknown_dotenv_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LABELLOOP_BATCHH=4\n")
    with pytest.raises(ConfigError, match="batch"):
        load_settings()


def test_every_setting_can_be_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unknown-variable check knows every field's own name (no false alarm)."""
    monkeypatch.setenv("LABELLOOP_CONF", "0.5")
    monkeypatch.setenv("LABELLOOP_CONFIG", "")
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    assert load_settings().conf == 0.5


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from labelloop.cli import app

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "very-secret-token")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0
    assert "very-secret-token" not in result.output and "label_studio_api_key: **********" in result.output


def test_an_invalid_setting_is_one_line_from_the_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "labelloop", "export", "w.pt", "--precision", "int4"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: invalid settings: precision: Input should be 'fp32' or 'int8'"]


def test_the_triton_url_follows_the_port_triton_is_served_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands after `up` with LABELLOOP_GRPC_PORT reach the Triton it started, not the default port."""
    monkeypatch.setenv("LABELLOOP_GRPC_PORT", "18101")
    assert load_settings().triton_url == "127.0.0.1:18101"
    monkeypatch.setenv("LABELLOOP_TRITON_URL", "triton.internal:9001")
    assert load_settings().triton_url == "triton.internal:9001", "an explicit URL wins"
