"""Start and stop the ``tritonserver`` binary shipped in the nvidia-pytriton wheel.

No Docker and no PyTriton Python API: the binary runs directly, with a backend folder holding
the python backend and the stub built for the running interpreter.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from core.errors import ConfigError, TritonUnavailableError
from core.processes import port_in_use, stop_group

__all__ = ["TritonInstall", "TritonProcess", "find_triton"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel put the server, the python backend and the stub for this Python."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_triton() -> TritonInstall:
    """Locate tritonserver in the installed nvidia-pytriton wheel, or say what is missing."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("nvidia-pytriton is not installed: run `make setup` (or pip install nvidia-pytriton)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    if not install.binary.is_file():
        raise ConfigError(f"tritonserver binary missing at {install.binary}")
    if not install.stub.is_file():
        raise ConfigError(f"no python backend stub for Python {py} at {install.stub}")
    return install


def _prepare_backends(install: TritonInstall, state_dir: Path) -> Path:
    """A backend folder with the python backend and the stub matching this interpreter."""
    backends = state_dir / "triton" / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (*install.python_backend.iterdir(), install.stub):
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return backends


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class TritonProcess:
    """One tritonserver subprocess, in explicit model-control mode, every endpoint bound to ``host``.

    The HTTP/REST endpoint stays closed unless ``http`` asks for it: labelloop's clients and model
    control use gRPC, and the metrics have their own port.
    """

    def __init__(
        self,
        model_repository: Path,
        state_dir: Path,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_file: Path | None = None,
        http: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.ports = {"grpc": grpc_port, "metrics": metrics_port} | ({"http": http_port} if http else {})
        self.log_file = (log_file or self.state_dir / "logs" / "triton.log").resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        # tritonserver binds 0.0.0.0 for any address not given: every endpoint gets ``host`` explicitly.
        if "http" in self.ports:
            http = [f"--http-address={self.host}", f"--http-port={self.ports['http']}"]
        else:
            http = ["--allow-http=false"]
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            # Loading is ours to drive (see serving.control): a broken version must not stop the server.
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-port={self.ports['metrics']}",
            *http,
            "--log-verbose=0",
        ]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        """The stub embeds libpython in isolated mode: it finds site-packages via ``python3`` on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(install.libs), str(install.binary.parent.parent / "lib")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
        env.pop("PYTHONPATH", None)
        return env

    def start(self) -> None:
        """Start the server (non-blocking); fails fast on a missing repository or taken port."""
        if not self.model_repository.is_dir():
            raise ConfigError(f"model repository {self.model_repository} does not exist")
        if not any(p.joinpath("config.pbtxt").is_file() for p in self.model_repository.iterdir()):
            raise ConfigError(
                f"model repository {self.model_repository} has no models: run `labelloop bootstrap` "
                "or `labelloop export WEIGHTS.pt`"
            )
        if self.host not in _LOOPBACK:
            logger.warning(
                "tritonserver listens on %s: its gRPC endpoint, model control included, is open to whoever "
                "reaches that address",
                self.host,
            )
        for kind, port in self.ports.items():
            if port_in_use(self.host, port):
                raise ConfigError(f"{kind} port {self.host}:{port} is already in use")
        install = find_triton()
        backends = _prepare_backends(install, self.state_dir)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(install, backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(install),
                cwd=self.state_dir,
                start_new_session=True,
            )
        logger.info("tritonserver pid %d, gRPC %s, log %s", self._proc.pid, self.grpc_url, self.log_file)

    def wait_live(self, timeout_s: float) -> None:
        """Wait until the gRPC port accepts connections (the server is up, models may still load)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise TritonUnavailableError(f"tritonserver exited during start-up; see {self.log_file}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.host, self.ports["grpc"])) == 0:
                    return
            time.sleep(0.2)
        raise TritonUnavailableError(f"tritonserver not listening after {timeout_s:.0f}s; see {self.log_file}")

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it will not go; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        stop_group(proc, "tritonserver", timeout_s)
        logger.info("tritonserver stopped")
