"""What this machine allows without any MTA: bench/relay's physical ceiling.

- ``direct_rate``: the same ``smtp-source`` workload straight into a fresh ``smtp-sink``, no MTA
  between: the most messages per second the load generator and the sink reach on loopback.
- ``commit_rate``: durable commits per second on the filesystem the queues live on, as the
  queue makes them (SQLite in WAL mode, ``synchronous=FULL``, one small row per transaction,
  one connection): the rate one commit at a time allows; a group commit carries many
  messages per commit, so it bounds commits, not messages.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def direct_rate(
    source_argv: Callable[[int], Sequence[str]], sink_port: int, messages: int,
    sink_count: Callable[[], int], timeout: float,
) -> float:
    """Messages per second from the start of smtp-source until the sink counted them all."""
    started = time.monotonic()
    proc = subprocess.run(list(source_argv(sink_port)), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source into smtp-sink failed: {proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while sink_count() < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"smtp-sink counted {sink_count()}/{messages}")
        time.sleep(0.005)
    return messages / (time.monotonic() - started)


def commit_rate(directory: Path, seconds: float = 2.0) -> float:
    """Fsynced single-row SQLite WAL commits per second in ``directory``."""
    path = directory / "commit-rate.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x BLOB)")
        row = b"x" * 1024
        commits = 0
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            db.execute("BEGIN")
            db.execute("INSERT INTO t VALUES (?)", (row,))
            db.execute("COMMIT")
            commits += 1
        return commits / elapsed
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
