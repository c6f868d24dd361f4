"""The one typed settings object.

Precedence, lowest to highest: field defaults < YAML file < ``.env`` < environment < CLI flags.
Every field reads ``LABELLOOP_<FIELD>`` from the environment; the Label Studio and basic-auth
fields also accept the names Label Studio's own ML backends use (``LABEL_STUDIO_URL``, ...).
The YAML file is ``labelloop.yaml`` in the working directory, or the path in ``LABELLOOP_CONFIG``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from core.errors import ConfigError

__all__ = ["CONFIG_ENV", "Precision", "Settings", "get_settings", "load_settings", "reference_markdown"]

CONFIG_ENV = "LABELLOOP_CONFIG"
Precision = Literal["fp32", "int8"]
_DEFAULT_YAML = "labelloop.yaml"


def _aliases(name: str, *plain: str) -> AliasChoices:
    """The prefixed name wins over Label Studio's own name; the field name serves init kwargs."""
    return AliasChoices(f"LABELLOOP_{name.upper()}", *plain, name)


class Settings(BaseSettings):
    """Everything labelloop can be told; see the README's configuration reference."""

    model_config = SettingsConfigDict(
        env_prefix="LABELLOOP_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        protected_namespaces=(),
    )

    # Serving -----------------------------------------------------------------
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address (host:port).")
    model_name: str = Field("defect_detector", description="Name of the detector in the model repository.")
    model_repository: Path = Field(Path("model_repository"), description="Triton model repository folder.")
    state_dir: Path = Field(Path(".labelloop"), description="Logs, databases, datasets and run files.")
    host: str = Field("127.0.0.1", description="Address tritonserver binds to.")
    grpc_port: int = Field(8001, description="tritonserver gRPC port.")
    http_port: int = Field(8000, description="tritonserver HTTP port.")
    metrics_port: int = Field(8002, description="tritonserver metrics port.")
    triton_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline for Triton calls.")
    triton_concurrency: int = Field(8, ge=1, description="Most Triton requests in flight from one client.")
    triton_retries: int = Field(3, ge=0, description="Retries (with backoff) on UNAVAILABLE.")
    triton_start_timeout_s: float = Field(120.0, gt=0, description="How long `serve` waits for ready.")
    instance_count: int = Field(2, ge=1, description="Triton model instances (python runtime); see Performance.")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per instance; 0 = all cores.")
    max_batch_size: int = Field(8, ge=1, description="Triton max_batch_size; also the dynamic batch cap.")
    batch_delay_us: int = Field(0, ge=0, description="Dynamic batcher max queue delay (microseconds).")
    rect: bool = Field(
        True,
        description="Letterbox each image to its smallest stride-multiple rectangle, not imgsz x imgsz "
        "(ultralytics' predict default; less compute for non-square images).",
    )
    conf: float = Field(0.25, ge=0, le=1, description="Default score threshold.")
    iou: float = Field(0.7, gt=0, le=1, description="Default NMS IoU threshold.")
    max_image_bytes: int = Field(50_000_000, gt=0, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(60_000_000, gt=0, description="Largest decoded image (w*h) accepted.")
    precision: Precision = Field(
        "fp32", description="Published ONNX: fp32, or int8 (CPU boxes: about 2x faster; calibrated and gated)."
    )
    int8_min_agreement: float = Field(
        0.95, gt=0, le=1, description="INT8 is published only if its detections match FP32's at least this well (F1)."
    )

    # Bridge (Label Studio ML backend) ---------------------------------------------
    bridge_host: str = Field("127.0.0.1", description="Address the bridge listens on.")
    bridge_port: int = Field(9090, description="Port the bridge listens on.")
    label_studio_url: str | None = Field(
        None,
        validation_alias=_aliases("label_studio_url", "LABEL_STUDIO_URL"),
        description="Label Studio base URL, for fetching task images and the API.",
    )
    label_studio_api_key: SecretStr | None = Field(
        None,
        validation_alias=_aliases("label_studio_api_key", "LABEL_STUDIO_API_KEY"),
        description="Legacy token or Personal Access Token.",
    )
    basic_auth_user: str | None = Field(
        None,
        validation_alias=_aliases("basic_auth_user", "BASIC_AUTH_USER"),
        description="Bridge basic-auth user; auth is on when user and password are set.",
    )
    basic_auth_pass: SecretStr | None = Field(
        None,
        validation_alias=_aliases("basic_auth_pass", "BASIC_AUTH_PASS"),
        description="Bridge basic-auth password.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra hosts images may be fetched from (comma-separated); the LS host is always allowed.",
    )
    fetch_concurrency: int = Field(8, ge=1, description="Concurrent image downloads.")
    fetch_timeout_s: float = Field(15.0, gt=0, description="Per-image download timeout.")
    prelabel_batch_size: int = Field(64, ge=1, description="`prelabel`: tasks read, predicted and written per page.")

    # Trainer ---------------------------------------------------------------
    epochs: int = Field(30, ge=1, description="Training epochs.")
    imgsz: int = Field(320, ge=32, description="Training / export image size.")
    batch: int = Field(16, ge=1, description="Training batch size.")
    device: str = Field("", description="Training device: '' picks a GPU when present, else 'cpu'.")
    patience: int = Field(50, ge=0, description="Early-stopping patience (epochs).")
    retrain_below_map50: float = Field(0.60, description="Re-train when the served mAP50 is below this.")
    retrain_delta_map50: float = Field(-0.03, description="Re-train when the served mAP50 moved by less.")
    deploy_margin_map50: float = Field(0.02, description="Deploy when candidate mAP50 > served + this.")
    train_every_annotations: int = Field(50, ge=1, description="`trainer watch`: train after this many new.")

    # Stack (`labelloop up`) -------------------------------------------------------
    label_studio_port: int = Field(8080, description="Port of the Label Studio that `up` starts.")
    label_studio_venv: Path = Field(Path(".venv-ls"), description="Label Studio's own virtual environment.")
    project_title: str = Field("Defect detection", description="Project `up` creates and connects.")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_path = os.environ.get(CONFIG_ENV) or _DEFAULT_YAML
        if os.environ.get(CONFIG_ENV) and not Path(yaml_path).is_file():
            raise ConfigError(f"{CONFIG_ENV}={yaml_path}: no such file")
        yaml = YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path)
        return (init_settings, env_settings, dotenv_settings, yaml)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def load_settings(**overrides: Any) -> Settings:
    """Build settings with CLI flags on top; ``None`` means "flag not given"."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from files and environment (no flags)."""
    return load_settings()


def _env_names(name: str, alias: object) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [str(c) for c in alias.choices if str(c) != name]
    return [f"LABELLOOP_{name.upper()}"]


def reference_markdown() -> str:
    """The README's configuration reference, generated from the fields so it cannot drift."""
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else (",".join(default) if isinstance(default, list) else str(default))
        envs = " / ".join(f"`{e}`" for e in _env_names(name, info.validation_alias))
        rows.append(f"| `{name}` | {envs} | `{shown}` | {info.description} |")
    return "\n".join(rows) + "\n"
