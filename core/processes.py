"""Background processes that ``labelloop up`` starts and ``labelloop down`` stops (and only those).

Each daemon gets a record ``<state>/run/<name>.json`` with its pid, process-group id, command line
and start time; ``down`` signals a process only when all of them still match, so a recycled pid
never gets killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

__all__ = ["Daemon", "DaemonRecord", "port_in_use", "stop_group"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonRecord:
    """What we know about a daemon we started."""

    name: str
    pid: int
    cmdline: list[str]
    create_time: float
    log: str
    url: str = ""


class Daemon:
    """One named background process under a state folder."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.name = name
        self.record_path = state_dir / "run" / f"{name}.json"
        self.log_path = state_dir / "logs" / f"{name}.log"

    def record(self) -> DaemonRecord | None:
        try:
            return DaemonRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _process(self) -> psutil.Process | None:
        """Our process, if it is still the one we started."""
        rec = self.record()
        if rec is None:
            return None
        try:
            proc = psutil.Process(rec.pid)
            # argv[0] may be rewritten by a shebang; the arguments are ours exactly. While the new
            # program is being loaded, /proc shows no arguments at all: the start time decides then.
            cmdline = proc.cmdline()
            if abs(proc.create_time() - rec.create_time) > 1.0 or (
                cmdline and cmdline[-len(rec.cmdline[1:]) :] != rec.cmdline[1:]
            ):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def running(self) -> bool:
        return self._process() is not None

    def start(self, cmdline: list[str], env: dict[str, str], cwd: Path, url: str = "") -> DaemonRecord:
        """Start detached (own session), output appended to the daemon's log file."""
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmdline,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        rec = DaemonRecord(
            name=self.name,
            pid=proc.pid,
            cmdline=cmdline,
            create_time=psutil.Process(proc.pid).create_time(),
            log=str(self.log_path),
            url=url,
        )
        self.record_path.write_text(json.dumps(asdict(rec)))
        logger.info("started %s (pid %d), log %s", self.name, proc.pid, self.log_path)
        return rec

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the daemon's process group, SIGKILL after ``timeout_s``; True if something stopped."""
        proc = self._process()
        self.record_path.unlink(missing_ok=True)
        if proc is None:
            return False
        pgid = proc.pid  # started with start_new_session: the daemon leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        _reap_group(pgid)
        logger.info("stopped %s (pid %d)", self.name, pgid)
        return True


def _reap_group(pgid: int, grace_s: float = 5.0) -> None:
    """Give the rest of the group (e.g. Triton's python stubs) a moment, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    """SIGTERM the group a child leads (``start_new_session=True``), SIGKILL it after ``timeout_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop in %.0fs; killing it", name, timeout_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def port_in_use(host: str, port: int) -> bool:
    """Whether binding this address would fail: something else listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
