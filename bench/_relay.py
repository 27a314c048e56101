"""bench/relay: smtp-source -> MTA -> smtp-sink on loopback, deliverd against every peer.

The peers: Postfix (the machine's), Exim, OpenSMTPD (each from its unpacked Debian package) and
Haraka (from npm), all from ``deliverd_lab``, each configured to relay everything to the sink.

Each run starts a fresh MTA (empty durable queue) and a fresh sink, then times one workload:

- end-to-end: from the start of smtp-source until the sink has counted every message AND the
  MTA's queue is empty;
- injection: messages / the time smtp-source needed (every 250 received);
- latency: each MTA's own per-recipient ``delay=`` (arrival in its queue -> the sink's 250,
  10 ms resolution, the same field and parser for both); smtp-sink cannot stamp messages, and a
  sink of our own in Python would compete for the same CPUs as the MTA under test;
- CPU: /proc of the MTA's whole process tree (Postfix: master and every child; deliverd: its
  one process with all threads), snapshot before and after; peak memory: the tree's summed
  Pss (shared pages counted once) sampled every 200 ms, and the root's VmHWM in the JSON.

Runs alternate (deliverd, peers... then the reverse order) so drift hits every side; ratios are
paired per round and the median ratio of end-to-end messages/s per peer is the headline:
``ratio deliverd/<peer>: X.XX``. A peer that cannot be started here is reported as not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from _ceiling import commit_rate, direct_rate
from _chart import plot_ratios
from _proctree import RssSampler, cpu_seconds, descendants, status_kb
from _stats import median, percentile, ratio, sent_delays, table

from deliverd.queue.database import QueueDB
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered
from deliverd_lab.common import LabError, wait_for_port
from deliverd_lab.exim import EximRelay
from deliverd_lab.haraka import HarakaForward
from deliverd_lab.opensmtpd import OpenSmtpdRelay
from deliverd_lab.postfix import PostfixRelay

LOOPBACK = "127.0.0.1"
SENDER = "bench@source.test"
RECIPIENT = "sink@dest.test"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
PEERS = ("postfix", "exim", "opensmtpd", "haraka")
CACHE = Path(__file__).resolve().parent.parent / ".cache"

# What the benchmark sets in deliverd's spec, as a user would; reported in the JSON.
DELIVERD_LIMITS: dict[str, Any] = {
    "max_sessions": 30,
    "per_destination": 20,  # Postfix's default_destination_concurrency_limit
    "messages_per_session": 0,
    "smtp_workers": 1,  # the sessions in a worker process, delivery in the daemon: two cores
}


@dataclass(frozen=True)
class Workload:
    messages: int = 20_000
    sessions: int = 20
    size: int = 1024


@dataclass
class RunResult:
    mta: str
    round: int
    messages: int
    delivered: int
    injection_s: float
    end_to_end_s: float
    msgs_per_s: float
    injection_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    latency_samples: int
    cpu_s_per_1k: float
    peak_rss_mb: float
    lost: int
    duplicated: int
    extra: dict[str, Any] = field(default_factory=dict)


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# -- the sink ------------------------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink with its running counter (``-c``) written to a file we tail."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [SMTP_SINK, "-c", "-u", "postfix", f"{LOOPBACK}:{self.port}", "1024"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for_port(LOOPBACK, self.port, 10, "smtp-sink")

    def count(self) -> int:
        """Messages received so far (the last ``mesg=N`` of the counter line)."""
        with self.out.open("rb") as f:
            f.seek(max(0, self.out.stat().st_size - 200))
            tail = f.read().decode("ascii", "replace")
        marks = tail.rsplit("mesg=", 1)
        if len(marks) < 2:
            return 0
        digits = "".join(c for c in marks[1][:12] if c.isdigit())
        return int(digits) if digits else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the MTAs ------------------------------------------------------------------------------------


class Mta(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def tree(self) -> list[int]: ...
    def root(self) -> int: ...
    def queue_empty(self) -> bool: ...
    def log_text(self) -> str: ...
    def delays(self) -> list[float]: ...
    def settings(self) -> dict[str, Any]: ...


class Deliverd:
    name = "deliverd"

    def __init__(self, workdir: Path, sink_port: int, limits: dict[str, Any]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.limits = limits
        self.spec: dict[str, Any] = {
            "version": 1,
            "host": {"name": "deliverd.bench"},
            "listen": [{"address": LOOPBACK, "port": self.port}],
            "queue": {"path": str(workdir / "queue")},
            "routing": {"mode": "smarthost",
                        "smarthost": {"host": LOOPBACK, "port": sink_port, "tls": "none"}},
            "limits": limits,
            "dsn": {"notify_delayed": False},
        }
        write_rendered(normalise(self.spec), workdir / "etc")
        self.log_path = workdir / "deliverd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._db: QueueDB | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deliverd", "run", "-c",
                 str(self.workdir / "etc" / "deliverd.toml")],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"deliverd exited {self.proc.returncode}: {self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 1):
                return
            time.sleep(0.05)
        raise BenchError("deliverd did not listen within 30 s")

    def stop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def root(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tree(self) -> list[int]:
        return descendants(self.root())  # the daemon and its SMTP workers

    def queue_empty(self) -> bool:
        if self._db is None:
            self._db = QueueDB.open(self.workdir / "queue", create=False)
        return self._db.count() == 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def delays(self) -> list[float]:
        return sent_delays(self.log_text())

    def settings(self) -> dict[str, Any]:
        return {"limits": self.limits, "queue": "SQLite WAL, synchronous=FULL, group commit",
                "log": "text, INFO"}


class Postfix:
    name = "postfix"
    _QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.port = free_port()
        self.relay = PostfixRelay(
            workdir / "postfix", listen=LOOPBACK, port=self.port,
            relayhost=f"[{LOOPBACK}]:{sink_port}", hostname="postfix.bench", require_auth=False,
        )

    def start(self) -> None:
        self.relay.start()

    def stop(self) -> None:
        self.relay.stop()

    def root(self) -> int:
        pid = self.relay.pid
        if pid is None:
            raise BenchError("postfix master pid file missing")
        return pid

    def tree(self) -> list[int]:
        return descendants(self.root())

    def queue_empty(self) -> bool:
        for name in self._QUEUES:
            for _dirpath, _dirs, files in os.walk(self.relay.queue_dir / name):
                if files:
                    return False
        return True

    def log_text(self) -> str:
        return self.relay.log_text()

    def delays(self) -> list[float]:
        return sent_delays(self.log_text())

    def settings(self) -> dict[str, Any]:
        return {"relayhost": self.relay.relayhost,
                "config": "Debian defaults; queue fsynced before 250 (Postfix default)"}


class Peer:
    """Exim, OpenSMTPD or Haraka from ``deliverd_lab`` (unpacked packages / npm, own config)."""

    DURABILITY = {
        "exim": "spool -D/-H files fsynced before 250 (Exim default)",
        "opensmtpd": "queue_fs: message and envelope in the spool before 250 (fsync not traced)",
        "haraka": "no queue: smtp_forward relays during DATA, 250 is the smart host's",
    }

    def __init__(self, kind: str, workdir: Path, sink_port: int) -> None:
        self.name = kind
        self.port = free_port()
        classes: dict[str, type[EximRelay | OpenSmtpdRelay | HarakaForward]] = {
            "exim": EximRelay, "opensmtpd": OpenSmtpdRelay, "haraka": HarakaForward}
        self.server = classes[kind](workdir / kind, CACHE, listen=LOOPBACK, port=self.port,
                          smarthost=LOOPBACK, smarthost_port=sink_port)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def root(self) -> int:
        pid = self.server.pid
        if pid is None:
            raise BenchError(f"{self.name} is not running: {self.server.log_text()[-1000:]}")
        return pid

    def tree(self) -> list[int]:
        return descendants(self.root())

    def queue_empty(self) -> bool:
        return self.server.queue_empty()

    def log_text(self) -> str:
        return self.server.log_text()

    def delays(self) -> list[float]:
        return self.server.delays()

    def settings(self) -> dict[str, Any]:
        return {"durability": self.DURABILITY[self.name]}


def make_mta(kind: str, workdir: Path, sink_port: int, limits: dict[str, Any]) -> Mta:
    if kind == "deliverd":
        return Deliverd(workdir, sink_port, limits)
    if kind == "postfix":
        return Postfix(workdir, sink_port)
    return Peer(kind, workdir, sink_port)


# -- one run -------------------------------------------------------------------------------------


def _source(port: int, work: Workload) -> list[str]:
    return [SMTP_SOURCE, "-d", "-s", str(work.sessions), "-m", str(work.messages),
            "-l", str(work.size), "-M", "source.test", "-f", SENDER, "-t", RECIPIENT,
            f"{LOOPBACK}:{port}"]


def _wait_drained(mta: Mta, sink: Sink, want: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.count() >= want and mta.queue_empty():
            return time.monotonic()
        time.sleep(0.01)
    raise BenchError(f"{mta.name}: sink has {sink.count()}/{want} after {timeout:.0f}s")


def _wait_log(mta: Mta, want: int, timeout: float = 10.0) -> list[float]:
    deadline = time.monotonic() + timeout
    delays = mta.delays()
    if isinstance(mta, Peer) and mta.name == "haraka":
        return delays  # no queue, no queue delay in its log
    while len(delays) < want and time.monotonic() < deadline:
        time.sleep(0.2)  # Postfix's postlogd writes asynchronously
        delays = mta.delays()
    return delays


def run_once(kind: str, rnd: int, work: Workload, base: Path, limits: dict[str, Any],
             profile: Path | None) -> RunResult:
    workdir = base / f"{kind}-{rnd}"
    workdir.mkdir()
    workdir.chmod(0o755)
    sink = Sink(workdir)
    spy: subprocess.Popen[bytes] | None = None
    mta: Mta | None = None
    try:
        mta = make_mta(kind, workdir, sink.port, limits)
        mta.start()
        time.sleep(0.5)  # let start-up work (Postfix's first queue scan) settle
        if profile is not None and kind == "deliverd":
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                 str(mta.root()), "--format", "raw", "--rate", "200", "-o", str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        root = mta.root()
        cpu0 = cpu_seconds(mta.tree(), root)
        sampler = RssSampler(mta.tree)
        sampler.start()
        t0 = time.monotonic()
        source = subprocess.run(_source(mta.port, work), capture_output=True, text=True,
                                timeout=max(600, work.messages / 20), check=False)
        t_inj = time.monotonic()
        if source.returncode != 0:
            raise BenchError(f"smtp-source failed against {kind}: {source.stderr.strip()}")
        t_end = _wait_drained(mta, sink, work.messages, timeout=max(300, work.messages / 20))
        cpu = cpu_seconds(mta.tree(), root) - cpu0
        peak_kb = sampler.stop()
        hwm_kb = status_kb(root, "VmHWM")
        time.sleep(0.5)  # anything still arriving now would be a duplicate
        delivered = sink.count()
        delays = _wait_log(mta, work.messages)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        if mta is not None:
            mta.stop()
        sink.stop()
    e2e = t_end - t0
    return RunResult(
        mta=kind, round=rnd, messages=work.messages, delivered=delivered,
        injection_s=t_inj - t0, end_to_end_s=e2e, msgs_per_s=work.messages / e2e,
        injection_per_s=work.messages / (t_inj - t0),
        latency_p50_s=percentile(delays, 50), latency_p99_s=percentile(delays, 99),
        latency_samples=len(delays), cpu_s_per_1k=cpu * 1000 / work.messages,
        peak_rss_mb=peak_kb / 1024, lost=max(0, work.messages - delivered),
        duplicated=max(0, delivered - work.messages),
        extra={"settings": mta.settings(), "root_vmhwm_mb": hwm_kb / 1024},
    )


# -- the whole benchmark -------------------------------------------------------------------------

RATIO_METRICS = (
    ("msgs_per_s", "end-to-end msg/s"),
    ("injection_per_s", "injection msg/s"),
    ("latency_p50_s", "p50 latency"),
    ("latency_p99_s", "p99 latency"),
    ("cpu_s_per_1k", "CPU s/1k"),
    ("peak_rss_mb", "peak RSS"),
)
COLUMNS = (
    ("mta", "MTA"), ("round", "round"), ("msgs_per_s", "msg/s e2e"),
    ("injection_per_s", "inject/s"), ("latency_p50_s", "p50 s"), ("latency_p99_s", "p99 s"),
    ("cpu_s_per_1k", "CPU s/1k"), ("peak_rss_mb", "RSS MB"), ("lost", "lost"),
    ("duplicated", "dup"),
)


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    version = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    return {"nproc": os.cpu_count(), "memory": first("/proc/meminfo", "MemTotal"),
            "cpu": first("/proc/cpuinfo", "model name"), "kernel": platform.release(),
            "python": platform.python_version(), "postfix": version}


def summarise(results: list[RunResult], peers: list[str], not_measured: dict[str, str],
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    rows: list[dict[str, Any]] = [asdict(r) for r in results]
    for kind in ("deliverd", *peers):
        mine = [r for r in rows if r["mta"] == kind]
        if not mine:
            rows.append({"mta": kind, "round": "not measured"})
            continue
        rows.append({"mta": kind, "round": "median",
                     **{k: median(r[k] for r in mine) for k, _ in COLUMNS[2:8]},
                     "lost": sum(r["lost"] for r in mine),
                     "duplicated": sum(r["duplicated"] for r in mine)})
    ratios: dict[str, dict[str, list[float]]] = {}
    rounds = sorted({r.round for r in results})
    for peer in peers:
        if peer in not_measured:
            continue
        ratios[peer] = {}
        for key, label in RATIO_METRICS:
            ratios[peer][label] = []
            for rnd in rounds:
                a = [asdict(r)[key] for r in results if r.mta == "deliverd" and r.round == rnd]
                b = [asdict(r)[key] for r in results if r.mta == peer and r.round == rnd]
                if a and b:
                    ratios[peer][label].append(ratio(a[0], b[0]))
    return rows, ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/relay", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=Workload.messages)
    p.add_argument("--sessions", type=int, default=Workload.sessions)
    p.add_argument("--size", type=int, default=Workload.size, help="message size in bytes")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the order alternates)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated peers to compare with (default {','.join(PEERS)})")
    p.add_argument("--only", choices=("deliverd", *PEERS), default=None,
                   help="run one MTA only (profiling); no ratio then")
    p.add_argument("--per-destination", type=int, default=DELIVERD_LIMITS["per_destination"],
                   help="deliverd limits.per_destination")
    p.add_argument("--smtp-workers", type=int, default=DELIVERD_LIMITS["smtp_workers"],
                   help="deliverd limits.smtp_workers (0: the daemon takes the sessions itself)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy raw profile of deliverd's last run to this file")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for relay-<time>.json and .png")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    args.peers = [x for x in args.peers.split(",") if x]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peers: {', '.join(sorted(unknown))} (known: {', '.join(PEERS)})")
    return args


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="deliverd-relay-"))
    base.chmod(0o755)  # Postfix's unprivileged processes must traverse it
    try:
        yield base
    finally:
        if keep:
            print(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _ceiling(work: Workload, base: Path) -> dict[str, float]:
    """The machine's limits for this workload (bench/_ceiling.py), measured once per run."""
    workdir = base / "ceiling"
    workdir.mkdir()
    workdir.chmod(0o755)
    sink = Sink(workdir)
    try:
        direct = direct_rate(lambda port: _source(port, work), sink.port, work.messages,
                             sink.count, timeout=max(120, work.messages / 100))
    finally:
        sink.stop()
    return {"direct_msgs_per_s": direct, "commits_per_s": commit_rate(workdir)}


def _print_share_of_ceiling(results: list[RunResult], ceiling: dict[str, float]) -> None:
    for kind in dict.fromkeys(r.mta for r in results):
        rate = median([r.msgs_per_s for r in results if r.mta == kind])
        print(f"{kind}: {rate / ceiling['direct_msgs_per_s']:.1%} of the no-MTA rate")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not Path(tool).exists():
            print(f"bench/relay: {tool} missing (Debian package postfix)", file=sys.stderr)
            return 2
    work = Workload(args.messages, args.sessions, args.size)
    limits = {**DELIVERD_LIMITS, "per_destination": args.per_destination,
              "smtp_workers": args.smtp_workers}
    kinds = [args.only] if args.only else ["deliverd", *args.peers]
    results: list[RunResult] = []
    not_measured: dict[str, str] = {}
    with _workdir(args.keep) as base:
        ceiling = _ceiling(work, base)
        print(f"ceiling: smtp-source -> smtp-sink with no MTA {ceiling['direct_msgs_per_s']:,.0f}"
              f" msg/s; fsynced SQLite WAL commits on the queue filesystem "
              f"{ceiling['commits_per_s']:,.0f}/s", flush=True)
        for rnd in range(1, args.rounds + 1):
            order = kinds if rnd % 2 else kinds[::-1]
            for kind in order:
                if kind in not_measured:
                    continue
                try:
                    result = run_once(kind, rnd, work, base, limits, args.profile)
                except (BenchError, LabError) as exc:
                    if kind == "deliverd":
                        raise
                    not_measured[kind] = str(exc).strip().splitlines()[0][:300]
                    print(f"round {rnd} {kind:9s} not measured: {not_measured[kind]}",
                          flush=True)
                    continue
                results.append(result)
                print(f"round {rnd} {kind:9s} {result.msgs_per_s:8.0f} msg/s end-to-end, "
                      f"{result.injection_per_s:8.0f} injected/s, lost {result.lost}, "
                      f"dup {result.duplicated}", flush=True)
    if args.only:
        rows = [asdict(r) for r in results]
        print(table(rows, COLUMNS))
        _print_share_of_ceiling(results, ceiling)
        return 0
    rows, ratios = summarise(results, args.peers, not_measured)
    headlines = {peer: median(r["end-to-end msg/s"]) for peer, r in ratios.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"relay-{stamp}.json"
    png_path = args.out / f"relay-{stamp}.png"
    title = (f"deliverd / peers, {work.messages} x {work.size} B, {work.sessions} sessions, "
             f"{args.rounds} rounds")
    flat = {f"{peer}: {label}": values for peer, series in ratios.items()
            for label, values in series.items()
            if label in ("end-to-end msg/s", "CPU s/1k")}
    renderer = plot_ratios(flat, png_path, title)
    json_path.write_text(json.dumps({
        "workload": asdict(work), "rounds": args.rounds, "machine": machine(),
        "peers": args.peers, "not_measured": not_measured,
        "deliverd_limits": limits, "runs": [asdict(r) for r in results], "ceiling": ceiling,
        "ratios": ratios,
        "median_ratios": {p: {k: median(v) for k, v in r.items()} for p, r in ratios.items()},
        "ratio_deliverd": headlines, "ratio_deliverd_postfix": headlines.get("postfix"),
        "plot": png_path.name, "plot_renderer": renderer,
        "latency_source": "each MTA's own log: Postfix/deliverd delay=, Exim QT=, OpenSMTPD "
                          "delay= (whole seconds); Haraka has no queue delay",
    }, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    print(table(rows, COLUMNS))
    for peer, series in ratios.items():
        print(f"median ratios deliverd/{peer}: " + ", ".join(
            f"{k} {median(v):.2f}" for k, v in series.items()))
    _print_share_of_ceiling(results, ceiling)
    print(f"results: {json_path}  plot: {png_path}")
    lost = sum(r.lost + r.duplicated for r in results)
    for peer in args.peers:
        if peer in headlines:
            print(f"ratio deliverd/{peer}: {headlines[peer]:.2f}")
        else:
            print(f"ratio deliverd/{peer}: not measured ({not_measured.get(peer, '?')})")
    return 1 if lost else 0
