"""The tritonserver command line: every endpoint on the configured host, HTTP closed unless asked for."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from core.errors import ConfigError
from serving.launcher import TritonInstall, TritonProcess

INSTALL = TritonInstall(Path("/opt/t/bin/tritonserver"), Path("/opt/t/python"), Path("/opt/t/stub"), Path("/opt/t/l"))


def _flags(process: TritonProcess) -> dict[str, str]:
    command = process.command(INSTALL, Path("/b"))
    return dict(arg.removeprefix("--").split("=", 1) for arg in command[1:])


def test_every_address_is_loopback_and_http_is_closed_by_default(tmp_path: Path) -> None:
    process = TritonProcess(tmp_path, tmp_path, grpc_port=9001, http_port=9000, metrics_port=9002)
    flags = _flags(process)
    assert flags["grpc-address"] == flags["metrics-address"] == "127.0.0.1"
    assert (flags["grpc-port"], flags["metrics-port"]) == ("9001", "9002")
    # tritonserver binds 0.0.0.0 to an address it is not given, and opens HTTP unless told not to.
    assert flags["allow-http"] == "false"
    assert "http-address" not in flags and "http-port" not in flags
    assert "0.0.0.0" not in " ".join(process.command(INSTALL, Path("/b")))
    assert set(process.ports) == {"grpc", "metrics"}


def test_http_opens_only_when_asked_and_on_the_same_host(tmp_path: Path) -> None:
    process = TritonProcess(tmp_path, tmp_path, host="10.1.2.3", http_port=9000, http=True)
    flags = _flags(process)
    assert "allow-http" not in flags
    assert flags["http-address"] == flags["grpc-address"] == flags["metrics-address"] == "10.1.2.3"
    assert flags["http-port"] == "9000"
    assert process.ports["http"] == 9000


def test_a_non_loopback_host_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    caplog.set_level(logging.WARNING, logger="serving.launcher")
    with socket.socket() as taken:  # a taken port stops start() before anything runs
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            with pytest.raises(ConfigError, match="already in use"):
                TritonProcess(tmp_path, tmp_path, host=host, grpc_port=port, metrics_port=port).start()
            assert ("model control included" in caplog.text) == (host == "0.0.0.0")
