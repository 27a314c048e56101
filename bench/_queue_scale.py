"""bench/queue-scale: a big queue of deferred mail, and what it costs the daemon to start.

For each size N: fill a fresh queue with N deferred messages (1 KiB each, due tomorrow) by
batched inserts straight into the queue database (schema made by ``QueueDB.open``); then
start ``deliverd run`` on it and time restart-to-ready: from spawning the process until its log
says ``scheduler ready`` (the listener is bound before that, and the line is written once the
scheduler's first ``due`` query has returned). The daemon's RSS is read then (VmRSS, VmHWM),
and one scrape of its Prometheus endpoint is timed (the queue gauges are read at scrape time).
Then ``deliverd queue list --json`` runs with its output read as it comes: the time to the first
message, the time to the end of the whole JSON, the command's CPU time and peak RSS
(``wait4``'s rusage); ``queue list --state deferred --limit 100`` and ``queue summary`` are
timed too.
The fill uses ``synchronous=OFF``: it is set-up, not what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def render(workdir: Path, port: int, metrics_port: int) -> Path:
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": "deliverd.bench"},
        "listen": [{"address": LOOPBACK, "port": port}],
        "queue": {"path": str(workdir / "queue")},
        # Nothing is due, so nothing is sent; a closed loopback port if something were.
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": LOOPBACK, "port": free_port(), "tls": "none"}},
        "metrics": {"listen": f"{LOOPBACK}:{metrics_port}"},
    }
    write_rendered(normalise(spec), workdir / "etc")
    return workdir / "etc" / "deliverd.toml"


def measure(workdir: Path, count: int) -> dict[str, Any]:
    workdir.mkdir()
    fill_s = fill(workdir / "queue", count)
    db_mb = (workdir / "queue" / DB_NAME).stat().st_size / 2**20
    port, metrics_port = free_port(), free_port()
    config = render(workdir, port, metrics_port)
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
        scrape_s, deferred = scrape(metrics_port)
        listing = stream_list(config)
        t0 = time.monotonic()
        filtered = subprocess.run(
            [sys.executable, "-m", "deliverd", "queue", "-c", str(config), "list", "--json",
             "--state", "deferred", "--limit", "100"],
            capture_output=True, check=True,
        )
        filtered_s = time.monotonic() - t0
        t0 = time.monotonic()
        summary = subprocess.run(
            [sys.executable, "-m", "deliverd", "queue", "-c", str(config), "summary", "--json"],
            capture_output=True, check=True,
        )
        summary_s = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    if listing["entries"] != count or deferred != count:
        raise RuntimeError(f"queue list shows {listing['entries']} messages and the metrics "
                           f"{deferred} deferred recipients, expected {count}")
    if len(json.loads(filtered.stdout)) != min(100, count):
        raise RuntimeError("queue list --limit 100 did not stop at 100")
    if json.loads(summary.stdout)["total"]["total"] != count:
        raise RuntimeError("queue summary does not count every recipient")
    return {"messages": count, "fill_s": fill_s, "db_mb": db_mb, "ready_s": ready_s,
            "rss_mb": rss_mb, "hwm_mb": hwm_mb, "metrics_scrape_s": scrape_s,
            "queue_list_first_s": listing["first_s"], "queue_list_json_s": listing["whole_s"],
            "queue_list_rss_mb": listing["rss_mb"], "queue_list_json_mb": listing["mb"],
            "queue_list_cpu_s": listing["cpu_s"],
            "queue_list_filtered_s": filtered_s, "queue_summary_s": summary_s}


def scrape(port: int) -> tuple[float, float]:
    """Seconds for one scrape of /metrics, and the deferred recipients it reports."""
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=60) as reply:
        text = reply.read().decode()
    took = time.monotonic() - t0
    for line in text.splitlines():
        if line.startswith('deliverd_queue_recipients{state="deferred"}'):
            return took, float(line.split()[-1])
    raise RuntimeError("no deliverd_queue_recipients in the scrape")


def stream_list(config: Path) -> dict[str, float]:
    """Run ``queue list --json`` reading its output as it comes, never holding it."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deliverd", "queue", "-c", str(config), "list", "--json"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    first_s = 0.0
    entries = size = 0
    for line in proc.stdout:
        size += len(line)
        if line.startswith(b'{"queue_id"'):
            entries += 1
            if entries == 1:
                first_s = time.monotonic() - t0
    whole_s = time.monotonic() - t0
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"queue list exited {proc.returncode}")
    return {"first_s": first_s, "whole_s": whole_s, "entries": entries,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "mb": size / 2**20}


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
                  f"(peak {result['hwm_mb']:.1f}), scrape {result['metrics_scrape_s']:.3f} s; "
                  f"queue list --json: first message {result['queue_list_first_s']:.3f} s, "
                  f"whole {result['queue_list_json_s']:6.1f} s "
                  f"(CPU {result['queue_list_cpu_s']:.1f} s), "
                  f"RSS {result['queue_list_rss_mb']:.1f} MB; "
                  f"--state deferred --limit 100 {result['queue_list_filtered_s']:.2f} s; "
                  f"summary {result['queue_summary_s']:.1f} s", flush=True)
            shutil.rmtree(base / f"q{count}", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"queue-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"results": results}, indent=2))
    print(f"results: {path}")
    return 0
