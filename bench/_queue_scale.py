"""bench/queue-scale: a big queue of deferred mail, and what it costs the daemon to start.

For each size N: fill a fresh queue with N deferred messages (1 KiB each, due tomorrow) by
batched inserts straight into the queue database (schema made by ``QueueDB.open``); then
start ``deliverd run`` on it and time restart-to-ready: from spawning the process until its log
says ``scheduler ready`` (the listener is bound before that, and the line is written once the
scheduler's first ``due`` query has returned). The daemon's RSS is read then (VmRSS, VmHWM);
finally ``deliverd queue list --json`` is timed (it reads every message). The fill uses
``synchronous=OFF``: it is set-up, not what is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proctree import status_kb

from deliverd.queue.database import DB_NAME, QueueDB, RcptState, new_queue_id
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered

LOOPBACK = "127.0.0.1"
CHUNK = 50_000
BODY = b"Subject: queue scale\r\n\r\n" + b"x" * 998 + b"\r\n"
READY_MARK = "scheduler ready"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def fill(queue_dir: Path, count: int) -> float:
    """Insert ``count`` deferred messages; returns the seconds it took."""
    QueueDB.open(queue_dir).close()  # the schema, exactly as the engine makes it
    started = time.monotonic()
    conn = sqlite3.connect(queue_dir / DB_NAME, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    now = time.time()
    later = now + 86_400
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        ids = [new_queue_id(now) for _ in range(n)]
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (queue_id, sender, arrival, size) VALUES (?, ?, ?, ?)",
            ((qid, "bench@sender.test", now, len(BODY)) for qid in ids),
        )
        conn.executemany("INSERT INTO bodies (queue_id, data) VALUES (?, ?)",
                         ((qid, BODY) for qid in ids))
        conn.executemany(
            "INSERT INTO recipients (queue_id, idx, address, state, attempts, next_attempt,"
            " last_status, last_diagnostic) VALUES (?, 0, ?, ?, 1, ?, '4.4.1', ?)",
            ((qid, f"rcpt{done + i}@dest.test", RcptState.DEFERRED.value, later,
              "smtp; 421 4.4.1 try later") for i, qid in enumerate(ids)),
        )
        conn.execute("COMMIT")
        done += n
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - started


def render(workdir: Path, port: int) -> Path:
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": "deliverd.bench"},
        "listen": [{"address": LOOPBACK, "port": port}],
        "queue": {"path": str(workdir / "queue")},
        # Nothing is due, so nothing is sent; a closed loopback port if something were.
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": LOOPBACK, "port": free_port(), "tls": "none"}},
    }
    write_rendered(normalise(spec), workdir / "etc")
    return workdir / "etc" / "deliverd.toml"


def measure(workdir: Path, count: int) -> dict[str, Any]:
    workdir.mkdir()
    fill_s = fill(workdir / "queue", count)
    db_mb = (workdir / "queue" / DB_NAME).stat().st_size / 2**20
    port = free_port()
    config = render(workdir, port)
    log_path = workdir / "deliverd.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "deliverd", "run", "-c", str(config)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        while READY_MARK not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"deliverd exited: {log_path.read_text()}")
            if time.monotonic() - started > 300:
                raise RuntimeError("deliverd not ready after 300 s")
            time.sleep(0.01)
        ready_s = time.monotonic() - started
        with socket.create_connection((LOOPBACK, port), 5):
            pass  # listening, as the ready line promises
        rss_mb = status_kb(proc.pid, "VmRSS") / 1024
        hwm_mb = status_kb(proc.pid, "VmHWM") / 1024
        t0 = time.monotonic()
        listed = subprocess.run(
            [sys.executable, "-m", "deliverd", "queue", "-c", str(config), "list", "--json"],
            capture_output=True, check=True,
        )
        list_s = time.monotonic() - t0
        entries = len(json.loads(listed.stdout))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    if entries != count:
        raise RuntimeError(f"queue list shows {entries} messages, expected {count}")
    return {"messages": count, "fill_s": fill_s, "db_mb": db_mb, "ready_s": ready_s,
            "rss_mb": rss_mb, "hwm_mb": hwm_mb, "queue_list_json_s": list_s,
            "queue_list_json_mb": len(listed.stdout) / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/queue-scale", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="queue sizes to measure (default: 100000 1000000)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for queue-scale-<time>.json")
    args = p.parse_args(argv)
    results = []
    base = Path(tempfile.mkdtemp(prefix="deliverd-qscale-"))
    try:
        for count in args.messages:
            result = measure(base / f"q{count}", count)
            results.append(result)
            print(f"{count:>9,} queued: fill {result['fill_s']:6.1f} s, "
                  f"restart to ready {result['ready_s']:6.2f} s, RSS {result['rss_mb']:6.1f} MB "
                  f"(peak {result['hwm_mb']:.1f}), queue list --json "
                  f"{result['queue_list_json_s']:6.1f} s", flush=True)
            shutil.rmtree(base / f"q{count}", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"queue-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"results": results}, indent=2))
    print(f"results: {path}")
    return 0
