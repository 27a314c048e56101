"""sd_notify: the datagrams the engine sends to systemd, read from a real AF_UNIX datagram
socket standing where systemd's receiving end would be."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deliverd.ops.sdnotify import Notifier
from tests.fixtures.engine import Engine


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock, str(path)


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_ready_reaches_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier({"NOTIFY_SOCKET": path}).ready("listening on 127.0.0.1:25")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "listening on 127.0.0.1:25"}


def test_abstract_socket_written_with_an_at_sign() -> None:
    name = f"deliverd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert _fields(sock.recv(4096)) == {"STOPPING": "1"}


def test_reloading_carries_the_monotonic_clock(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    fields = _fields(sock.recv(4096))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog()
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_a_vanished_receiver_is_reported_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x")


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "4000000"}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
    ({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),  # for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str],
                                                    interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


def _receive_until(sock: socket.socket, key: str, seen: list[dict[str, str]]) -> dict[str, str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fields = _fields(sock.recv(4096))
        seen.append(fields)
        if key in fields:
            return fields
    raise AssertionError(f"no {key} in {seen}")


@pytest.mark.integration
def test_daemon_reports_ready_reload_stopping_and_pings_the_watchdog(
    engine_factory: Callable[..., Engine], receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    engine = engine_factory(start=False)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    with engine.log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deliverd", "run", "-c", str(engine.config),
                                 "--log-format", "json"], stdout=log, stderr=log, env=env)
    try:
        seen: list[dict[str, str]] = []
        ready = _receive_until(sock, "READY", seen)
        assert ready["STATUS"] == f"listening on 127.0.0.1:{engine.port}"
        # READY=1 comes only once the listener is bound: a connection is accepted at once.
        with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as client:
            assert client.recv(64).startswith(b"220")
        # The watchdog pings keep coming from the running loop (every 0.2 s).
        pings = 0
        while pings < 3:
            pings += "WATCHDOG" in _receive_until(sock, "WATCHDOG", seen)
        proc.send_signal(signal.SIGHUP)
        reloading = _receive_until(sock, "RELOADING", seen)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert _receive_until(sock, "READY", seen)["STATUS"].startswith("running")
        proc.send_signal(signal.SIGSTOP)  # a wedged loop: no more pings
        time.sleep(0.3)
        sock.settimeout(0)
        with pytest.raises(BlockingIOError):
            while True:
                sock.recv(4096)  # drain what was sent before the stop
        time.sleep(1.0)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        proc.send_signal(signal.SIGCONT)
        sock.settimeout(10)
        _receive_until(sock, "WATCHDOG", seen)
        proc.send_signal(signal.SIGTERM)
        _receive_until(sock, "STOPPING", seen)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
