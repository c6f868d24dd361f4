"""What ``labelloop bench`` runs against: its images, an image server, the bridge process, peak memory.

Everything here binds to 127.0.0.1 and is stopped by its owner (context managers), also on Ctrl-C.
Module-level imports stay light (``labelloop --help`` may load this module): httpx, numpy, psutil
and the serving side load where they are used.
"""

from __future__ import annotations

import http.server
import io
import logging
import os
import platform
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from core.errors import ConfigError, RepositoryError, TritonUnavailableError
from core.settings import Settings

if TYPE_CHECKING:
    import psutil

    from serving.launcher import TritonProcess
    from serving.repository import ModelRepository

__all__ = [
    "FULL",
    "QUICK",
    "BackboneTally",
    "BenchPlan",
    "Tally",
    "BenchImage",
    "BridgeProcess",
    "ImageServer",
    "LoopbackHTTPServer",
    "ProcessMonitor",
    "free_port",
    "label_config",
    "machine_info",
    "private_repository",
    "render_images",
]

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
_BRIDGE_STOP_S = 15.0
_POLL_S = 0.2


@dataclass(frozen=True)
class BenchPlan:
    """How much to measure: images, rounds, and images per throughput block."""

    images: int
    rounds: int
    block_images: int
    seed: int = 2024


QUICK = BenchPlan(images=16, rounds=3, block_images=64)
FULL = BenchPlan(images=32, rounds=8, block_images=128)


@dataclass
class Tally:
    """Everything measured, in seconds, before it becomes a report."""

    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    boxes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # (method, load) -> [images, seconds]
    work: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # bridge /metrics deltas over single-task requests: stage -> [seconds, images]
    bridge_stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    # Triton /metrics deltas per load: counter -> value
    triton: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    json_s_per_task: list[float] = field(default_factory=list)
    # CPU seconds per load and process role, and the images they were spent on
    cpu: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    cpu_images: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class BackboneTally:
    """The backbone section's measurements, in seconds, keyed by long side, before they become a report."""

    # What was measured: name, version, arch, patch and hidden size, layers, note, provider.
    model: dict[str, Any] = field(default_factory=dict)
    # (method, long side) -> per-image seconds; methods "raw", "pipeline", "triton"
    latency: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    # (method and load, long side) -> [images, seconds]
    work: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    # long side -> patch tokens per image, and the largest |Triton - raw| token difference seen
    tokens: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    publish_s: float = 0.0
    measure_s: float = 0.0
    rounds: int = 0


@dataclass(frozen=True)
class BenchImage:
    """One encoded bench image and where the image server serves it."""

    name: str
    data: bytes
    width: int
    height: int


def render_images(n: int, seed: int) -> list[BenchImage]:
    """Seeded synthetic inspection images (224-640 px a side, the default model's domain), as JPEG."""
    import numpy as np

    from trainer.synthetic import render_sample

    rng = np.random.default_rng(seed)
    images = []
    for k in range(n):
        image = render_sample(rng).image
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        images.append(BenchImage(f"img{k:03d}.jpg", buf.getvalue(), image.width, image.height))
    return images


def label_config(classes: list[str]) -> str:
    """A Label Studio config with one rectangle label per served class."""
    labels = "".join(f'<Label value="{name}"/>' for name in classes)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>'
    )


def private_repository(settings: Settings, dest: Path) -> tuple[ModelRepository, int]:
    """A copy of the served (newest) version under the Triton config the settings render.

    The user's repository is never touched; the tuning settings (instances, threads, batching) and
    this labelloop's Triton runtime (``model.py``) apply without publishing a version.
    """
    from serving.publish import detector_config
    from serving.repository import ModelRepository

    source = ModelRepository(settings.model_repository)
    name = settings.model_name
    version = source.latest(name)
    if version is None:
        raise RepositoryError(
            f"model {name!r} has no versions in {source.root}: run `labelloop bootstrap` or `labelloop export`"
        )
    if source.weights_path(name, version) is None:
        raise RepositoryError(f"{name} version {version} has no weights.pt: the seed comparison needs the .pt")
    repo = ModelRepository(dest)
    repo.write_config(detector_config(settings))
    shutil.copytree(source.version_dir(name, version), repo.version_dir(name, version))
    repo.install_runtime(name, version)
    return repo, version


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_private_triton(settings: Settings, repository: Path, work: Path, log_name: str) -> TritonProcess:
    """A bench's own tritonserver on free loopback ports, live; the caller stops it."""
    from serving.launcher import TritonProcess

    triton = TritonProcess(
        repository,
        work,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=settings.log_dir / log_name,
    )
    try:
        triton.start()
        triton.wait_live(settings.triton_start_timeout_s)
    except BaseException:
        triton.stop()
        raise
    return triton


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine the figures belong to."""
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": "none used",
    }


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """GET /<name> from memory, HTTP/1.1 keep-alive so the bridge reuses its connections."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (up to 40 ms on Linux). Web servers set TCP_NODELAY, and so does this one.
    disable_nagle_algorithm = True
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        data = self.server.files.get(self.path.lstrip("/").split("?", 1)[0])
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per image would swamp the bench's output."""


_Server = TypeVar("_Server", bound="LoopbackHTTPServer")


class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """An HTTP server on a free 127.0.0.1 port, serving from a thread while its ``with`` block runs."""

    daemon_threads = True

    def __init__(self, handler: Callable[..., socketserver.BaseRequestHandler], thread_name: str) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self.serve_forever, name=thread_name, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return f"http://{self.host}/{path.lstrip('/')}"

    def __enter__(self: _Server) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


class ImageServer(LoopbackHTTPServer):
    """The bench images over loopback HTTP, as Label Studio (or any http host) would serve them."""

    def __init__(self, images: list[BenchImage]) -> None:
        self.files = {image.name: image.data for image in images}
        super().__init__(_ImageHandler, "bench-images")


class BridgeProcess:
    """``python -m labelloop bridge`` in its own process, so its memory is its own."""

    def __init__(
        self, port: int, triton_url: str, model_name: str, state_dir: Path, log_file: Path, image_origin: str
    ) -> None:
        self.port = port
        self.image_origin = image_origin
        self.triton_url = triton_url
        self.model_name = model_name
        self.state_dir = state_dir
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "LABELLOOP_ALLOWED_ORIGINS": self.image_origin,
                "LABELLOOP_STATE_DIR": str(self.state_dir),
                # A private bridge on loopback for the bench's own requests: auth off, explicitly.
                "LABELLOOP_BRIDGE_AUTH": "none",
            }
        )
        return env

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "labelloop",
            "--log-level",
            "WARNING",
            "bridge",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--triton-url",
            self.triton_url,
            "--model",
            self.model_name,
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._environment(), start_new_session=True
            )
        logger.info("bridge pid %d on %s, log %s", self._proc.pid, self.url, self.log_file)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until /health says UP (Triton answered a real inference through the bridge)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    raise ConfigError(f"the bridge exited during start-up; see {self.log_file}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(_POLL_S)
        raise TritonUnavailableError(f"the bridge was not UP after {timeout_s:.0f}s; see {self.log_file}")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL; idempotent."""
        from core.processes import stop_group

        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, "the bridge", _BRIDGE_STOP_S)

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessMonitor:
    """Peak resident memory and CPU time of the processes under test.

    The peak is the kernel's own high-water mark (``VmHWM``), read when the monitor opens and
    closes: nothing samples in the background, competing for the GIL and the cores with what is
    timed. A group is a process and all its descendants (tritonserver and its python stubs),
    summed: shared pages count once per process, so the memory figure is an upper bound.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self._roots = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak_mb = dict.fromkeys(pids, 0.0)
        self.processes = dict.fromkeys(pids, 0)

    def _groups(self) -> dict[str, list[psutil.Process]]:
        import psutil

        groups = {}
        for name, root in self._roots.items():
            try:
                groups[name] = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        return groups

    @staticmethod
    def _peak_bytes(proc: psutil.Process) -> int:
        """The kernel's high-water mark; the current RSS where there is none (not Linux)."""
        try:
            with open(f"/proc/{proc.pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(proc.memory_info().rss)

    def _record(self) -> None:
        import psutil

        for name, group in self._groups().items():
            total = 0
            for proc in group:
                try:
                    total += self._peak_bytes(proc)
                except psutil.Error:
                    continue
            self.peak_mb[name] = max(self.peak_mb[name], total / 2**20)
            self.processes[name] = max(self.processes[name], len(group))

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far: each group's root, its descendants, and this process."""
        import psutil

        seconds: dict[str, float] = {}
        for name, group in self._groups().items():
            for role, procs in ((name, group[:1]), (f"{name} children", group[1:])):
                total = 0.0
                for proc in procs:
                    try:
                        times = proc.cpu_times()
                    except psutil.Error:
                        continue
                    total += times.user + times.system
                if procs:
                    seconds[role] = total
        own = psutil.Process().cpu_times()
        seconds["bench process"] = own.user + own.system
        return seconds

    def __enter__(self) -> ProcessMonitor:
        self._record()
        return self

    def __exit__(self, *exc: object) -> None:
        self._record()
