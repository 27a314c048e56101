"""A full disk under a running daemon: the listener answers 452, never loses an acknowledged
message, and the engine keeps delivering what it accepted."""

from __future__ import annotations

import contextlib
import os
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.engine import Engine
from tests.fixtures.smtp_sink import Sink

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(where)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def queue_on(disk: Path) -> dict[str, Any]:
    """The queue on ``disk``; the smart host unreachable at first (port 9: nothing listens), so
    mail stays queued until a test points the engine at its sink."""
    return {
        "queue": {"path": str(disk / "queue")},
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": 9, "tls": "none"}},
        "dsn": {"notify_delayed": False},
        # The listener keeps 1.5 x this (plus WAL room) free for recording deliveries.
        "limits": {"max_message_size": "256KB"},
    }


def test_full_disk_refuses_with_452_and_delivers_every_acknowledged_message(
        engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
        tmp_path: Path) -> None:
    sink = smtp_sink()
    with tiny_tmpfs(tmp_path / "disk", "16m") as disk:
        engine = engine_factory(queue_on(disk))
        body = ("x" * 998 + "\r\n") * 60
        acknowledged: list[str] = []
        refusals: list[tuple[int, bytes]] = []
        for n in range(400):
            try:
                acknowledged.append(engine.submit("a@example.test", [f"r{n}@example.net"],
                                                  body=body))
            except (AssertionError, smtplib.SMTPException) as exc:
                refusals.append((getattr(exc, "smtp_code", 0), str(exc).encode()))
                if len(refusals) >= 3:
                    break
        assert acknowledged, "nothing fitted on the disk at all"
        assert refusals, "the disk never filled"
        assert all(b"452" in text for _, text in refusals), refusals
        # Room again on the smart host side: point the engine at the sink and reload.
        engine.reconfigure({"routing": {"smarthost": {"port": sink.port}}})
        engine.signal(1)  # SIGHUP
        delivered = engine.wait_for(
            lambda: {m.rcpt_tos[0] for m in sink.messages} >= {
                f"r{n}@example.net" for n in range(len(acknowledged))},
            timeout=90, what="every acknowledged message delivered")
        assert delivered
        engine.wait_for(lambda: engine.queue() == [], timeout=60, what="an empty queue")
        assert engine.stop() == 0
        log = engine.log_text()
        assert "cannot record" not in log and "failed unexpectedly" not in log
        assert len(sink.messages) == len(acknowledged)  # none twice: every outcome was written


def fill(disk: Path) -> Path:
    """Take every free byte of the filesystem, as another process on the host might."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_disk_filled_by_someone_else_pauses_retries_instead_of_redelivering_in_a_loop(
        engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
        tmp_path: Path) -> None:
    sink = smtp_sink()
    with tiny_tmpfs(tmp_path / "disk", "16m") as disk:
        engine = engine_factory(queue_on(disk))
        rcpts = [f"r{n}@example.net" for n in range(3)]
        for rcpt in rcpts:
            engine.submit("a@example.test", [rcpt])
            engine.wait_status(rcpt, "deferred")
        filler = fill(disk)
        engine.reconfigure({"routing": {"smarthost": {"port": sink.port}}})
        engine.signal(1)  # SIGHUP: the smart host is reachable now, the disk is full
        engine.wait_for(lambda: "cannot record the delivery attempt" in engine.log_text(),
                        what="the failed write to be noticed")
        time.sleep(5)
        assert len(sink.messages) <= len(rcpts)  # delivered, then paused: no tight loop
        filler.unlink()
        engine.wait_for(lambda: engine.queue() == [], timeout=90, what="an empty queue")
        got = [m.rcpt_tos[0] for m in sink.messages]
        assert set(got) == set(rcpts)
        assert len(got) <= 2 * len(rcpts)  # at least once; at most once more per message
        assert engine.stop() == 0
