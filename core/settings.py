"""The one typed settings object.

Precedence, lowest to highest: field defaults < YAML file < ``.env`` < environment < CLI flags.
Every field reads ``LABELLOOP_<FIELD>`` from the environment; the Label Studio and basic-auth
fields also accept the names Label Studio's own ML backends use (``LABEL_STUDIO_URL``, ...).
The YAML file is ``labelloop.yaml`` in the working directory, or the path in ``LABELLOOP_CONFIG``.
A key no field knows, in the YAML, ``.env`` or a ``LABELLOOP_`` variable, is an error naming the nearest
valid key: a typo must never pass silently.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
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


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(entry: str) -> str:
    """``scheme://host:port`` with the default port made explicit; ValueError names the expected form."""
    form = "write scheme://host[:port], e.g. https://images.example.com or http://10.0.0.5:9000"
    try:
        parts = urlsplit(entry.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{entry!r} is not an origin ({exc}): {form}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{entry!r} is not an origin: {form}")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{entry!r} is not an origin (no user, query or fragment): {form}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port if port is not None else _DEFAULT_PORTS[scheme]}"


class Settings(BaseSettings):
    """Everything labelloop can be told; see docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix="LABELLOOP_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        populate_by_name=True,
        protected_namespaces=(),
    )

    # Serving -----------------------------------------------------------------
    triton_url: str = Field(
        "127.0.0.1:8001", description="Triton gRPC address (host:port); default: host and grpc_port when those are set."
    )
    model_name: str = Field("defect_detector", description="Name of the detector in the model repository.")
    model_repository: Path = Field(Path("model_repository"), description="Triton model repository folder.")
    state_dir: Path = Field(Path(".labelloop"), description="Logs, databases, datasets and run files.")
    host: str = Field("127.0.0.1", description="Address tritonserver binds to.")
    grpc_port: int = Field(8001, description="tritonserver gRPC port.")
    http_port: int = Field(8000, description="tritonserver HTTP port.")
    metrics_port: int = Field(8002, description="tritonserver metrics port.")
    triton_http: bool = Field(
        False, description="Open tritonserver's HTTP/REST endpoint on `host` (labelloop itself uses gRPC)."
    )
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
    max_image_pixels: int = Field(
        60_000_000, gt=0, description="Largest decoded image (w*h) accepted; larger ones are refused from the header."
    )
    fast_jpeg_decode: bool = Field(
        False,
        description="Decode large JPEGs at a reduced DCT scale (faster, but not the trained pixels: scores move; "
        "see `labelloop bench`).",
    )
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
    bridge_auth: Literal["basic", "none"] = Field(
        "basic",
        description="Bridge auth: basic (configured pair, else one generated into <state_dir>/bridge-auth.json) "
        "or none (explicit; logs a warning).",
    )
    basic_auth_user: str | None = Field(
        None,
        validation_alias=_aliases("basic_auth_user", "BASIC_AUTH_USER"),
        description="Bridge basic-auth user; unset: the generated pair in <state_dir>/bridge-auth.json.",
    )
    basic_auth_pass: SecretStr | None = Field(
        None,
        validation_alias=_aliases("basic_auth_pass", "BASIC_AUTH_PASS"),
        description="Bridge basic-auth password.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra origins images may be fetched from, exactly scheme://host[:port], comma-separated "
        "(e.g. https://images.example.com); Label Studio's origin is always allowed.",
    )
    local_file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders file:// task URLs may be read from (comma-separated), checked after symlinks.",
    )
    webhook_max_bytes: int = Field(1_048_576, gt=0, description="Largest /webhook body accepted (413 beyond).")
    predict_deadline_s: float = Field(
        90.0, gt=0, description="Budget of one /predict from its arrival, Triton retries included (LS waits 100 s)."
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

    @field_validator("allowed_origins", "local_file_roots", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        return [_origin(entry) for entry in value]

    @model_validator(mode="after")
    def _triton_url_follows_the_served_port(self) -> Settings:
        """Set ``grpc_port`` (or ``host``) and not ``triton_url``: clients go where `serve`/`up` listen."""
        if "triton_url" not in self.model_fields_set and {"grpc_port", "host"} & self.model_fields_set:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            self.triton_url = f"{host}:{self.grpc_port}"
        return self

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
        return (init_settings, _UnknownEnvCheck(settings_cls), env_settings, dotenv_settings, yaml)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def _nearest(key: str) -> str:
    """``; did you mean 'x'?`` for the field name closest to ``key``, or nothing."""
    name = key.lower().removeprefix("labelloop_")
    close = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class _UnknownEnvCheck(PydanticBaseSettingsSource):
    """Refuses ``LABELLOOP_`` variables that name no setting (pydantic-settings ignores them)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = {CONFIG_ENV}
        for name, info in Settings.model_fields.items():
            known.update(e.upper() for e in _env_names(name, info.validation_alias))
        for key in os.environ:
            upper = key.upper()
            if upper.startswith("LABELLOOP_") and upper not in known:
                raise ConfigError(f"unknown setting {key} in the environment{_nearest(key)}")
        return {}


def _problem(error: Any) -> str:
    where = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"unknown setting {where!r}{_nearest(where)}"
    return f"{where}: {error['msg']}"


def load_settings(**overrides: Any) -> Settings:
    """Build settings with CLI flags on top; ``None`` means "flag not given"."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {'; '.join(_problem(e) for e in exc.errors())}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from files and environment (no flags)."""
    return load_settings()


def _env_names(name: str, alias: object) -> list[str]:
    if isinstance(alias, AliasChoices):
        return [str(c) for c in alias.choices if str(c) != name]
    return [f"LABELLOOP_{name.upper()}"]


def reference_markdown() -> str:
    """docs/configuration.md's reference table, generated from the fields so it cannot drift."""
    rows = ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else (",".join(default) if isinstance(default, list) else str(default))
        envs = " / ".join(f"`{e}`" for e in _env_names(name, info.validation_alias))
        rows.append(f"| `{name}` | {envs} | `{shown}` | {info.description} |")
    return "\n".join(rows) + "\n"
