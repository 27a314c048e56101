"""kill -9 crash harness: prove that no acknowledged message is ever lost.

The rule is docs/architecture.md, "Durability".

One run: a counting SMTP sink (aiosmtpd in a thread, slow on purpose so deliveries are in
flight), a ``deliverd run`` subprocess relaying everything to it as a smart host, and K rounds of
"stream submissions, SIGKILL the engine at a random instant, restart it on the same queue".
A token counts as ACKNOWLEDGED only once the listener's 250 after DATA was read; submissions cut
off by the kill are "unacknowledged" and may or may not arrive (both are fine). After the last
round the engine drains the queue, and every acknowledged token must have reached the sink at
least once; duplicates are expected (kills during delivery) and only counted.

The bookkeeping (``tally``) is pure; everything with sockets and processes lives in the classes
around it. Loopback only; every process and thread started here is stopped on the way out,
including on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from types import FrameType

from aiosmtpd.smtp import SMTP as SinkSMTP
from aiosmtpd.smtp import Envelope as SinkEnvelope
from aiosmtpd.smtp import Session as SinkSession

from deliverd.queue.database import QueueDB, QueueMissingError
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered

LOOPBACK = "127.0.0.1"
TOKEN_DOMAIN = "crash.bench"
SENDER = "bench@sender.test"
RECIPIENT_DOMAIN = "dest.test"
# The sink reads tokens only from the top-level header block: a DSN quotes the original headers
# (and so its Message-ID) in its body, and must not count as a delivery of that message.
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"^Message-ID:[ \t]*<([^>@\s]+)@" + re.escape(TOKEN_DOMAIN.encode()) + rb">",
                    re.IGNORECASE | re.MULTILINE)

# Engine log lines for a submission or a successful delivery: left out of failure reports.
_ROUTINE = re.compile(r'"status": "sent"|: client=\[')

EXIT_OK = 0
EXIT_LOST = 1
EXIT_HARNESS = 2


class HarnessError(Exception):
    """The harness could not do its job (the engine would not start, a port was taken...)."""


class _PortTaken(HarnessError):
    """The engine's listen port was taken by someone else while the engine was down."""


@dataclass(frozen=True)
class CrashOptions:
    rounds: int = 10
    sessions: int = 4  # concurrent submitters
    rate: float = 200.0  # total submissions per second across sessions; 0 = as fast as possible
    kill_min: float = 0.2  # the kill lands this many seconds into a round, at random up to...
    kill_max: float = 1.5
    sink_delay: float = 0.05  # seconds the sink sleeps per DATA: deliveries are in flight
    max_per_round: int = 2000  # per session: bounds the count even with --rate 0
    start_timeout: float = 30.0
    drain_timeout: float = 120.0
    settle: float = 1.0  # the sink count must stay unchanged this long once the queue is empty
    seed: int | None = None
    size: int = 0  # filler bytes in each message body (large-message mode: MBs, streamed)
    smtp_workers: int = 0  # limits.smtp_workers: the sessions in worker processes
    workdir: Path | None = None  # default: a temporary directory, removed unless keep
    keep: bool = False


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class RoundReport:
    index: int
    engine_start_s: float  # from spawning deliverd run to its readiness pid file
    kill_after_s: float  # planned delay from the start of submissions to SIGKILL
    attempted: int
    acknowledged: int
    unacknowledged: int  # in flight when the engine died: the 250 never came back
    rejected: int  # a definite non-250 reply: not acknowledged, not in flight
    deliveries_in_flight_at_kill: int  # sink DATA phases running when SIGKILL was sent
    sink_total_at_kill: int
    queued_messages_at_kill: int  # messages in the queue database right after the kill
    queued_recipients_at_kill: int  # of which recipients not yet final
    round_s: float


@dataclass(frozen=True)
class Tally:
    attempted: int
    acknowledged: int
    unacknowledged: int
    rejected: int
    delivered_unique: int
    delivered_total: int
    duplicates: int  # deliveries beyond the first of a token
    lost: tuple[str, ...]  # acknowledged, never delivered
    unacknowledged_delivered: int  # fine: the message was queued, the 250 never arrived
    unknown_delivered: tuple[str, ...]  # delivered tokens nobody submitted: must not happen


@dataclass
class CrashReport:
    options: dict[str, object]
    tally: Tally
    rounds: list[RoundReport]
    drained: bool
    still_queued: int
    drain_s: float
    total_s: float
    dsn_count: int
    workdir: str | None
    engine_errors: list[str] = field(default_factory=list)  # reported, not judged here
    engine_log_tail: str = ""
    damaged: list[str] = field(default_factory=list)  # delivered with a body not as submitted

    @property
    def lost(self) -> int:
        return len(self.tally.lost)

    @property
    def kills_with_queue_nonempty(self) -> int:
        return sum(1 for r in self.rounds if r.queued_messages_at_kill > 0)

    @property
    def kills_with_submissions_in_flight(self) -> int:
        return sum(1 for r in self.rounds if r.unacknowledged > 0)

    @property
    def kills_with_deliveries_in_flight(self) -> int:
        return sum(1 for r in self.rounds if r.deliveries_in_flight_at_kill > 0)

    @property
    def ok(self) -> bool:
        return (self.drained and not self.tally.lost and not self.tally.unknown_delivered
                and not self.damaged)

    def to_json(self) -> dict[str, object]:
        tally = asdict(self.tally)
        tally["lost_count"] = len(self.tally.lost)
        tally["lost"] = list(self.tally.lost[:50])  # a sample is enough to go and look
        tally["unknown_delivered"] = list(self.tally.unknown_delivered[:50])
        return {
            "ok": self.ok,
            **tally,
            "drained": self.drained,
            "damaged": self.damaged[:50],
            "still_queued": self.still_queued,
            "dsn_count": self.dsn_count,
            "kills_with_queue_nonempty": self.kills_with_queue_nonempty,
            "kills_with_submissions_in_flight": self.kills_with_submissions_in_flight,
            "kills_with_deliveries_in_flight": self.kills_with_deliveries_in_flight,
            "engine_errors": len(self.engine_errors),
            "engine_error_samples": self.engine_errors[:20],
            "drain_s": round(self.drain_s, 3),
            "total_s": round(self.total_s, 3),
            "rounds": [asdict(r) for r in self.rounds],
            "options": self.options,
            "workdir": self.workdir,
        }


def tally(
    attempted: Iterable[str],
    acknowledged: Iterable[str],
    rejected: Iterable[str],
    delivered: Counter[str],
) -> Tally:
    """What the run proves, from who was told 250 and what the sink saw. Pure."""
    tried = set(attempted)
    acked = set(acknowledged)
    refused = set(rejected) - acked
    unacked = tried - acked - refused
    seen = set(delivered)
    return Tally(
        attempted=len(tried),
        acknowledged=len(acked),
        unacknowledged=len(unacked),
        rejected=len(refused),
        delivered_unique=len(seen),
        delivered_total=sum(delivered.values()),
        duplicates=sum(n - 1 for n in delivered.values() if n > 1),
        lost=tuple(sorted(acked - seen)),
        unacknowledged_delivered=len(unacked & seen),
        unknown_delivered=tuple(sorted(seen - tried)),
    )


def kill_delays(rng: random.Random, rounds: int, low: float, high: float) -> list[float]:
    """The instant of each round's SIGKILL, drawn up front so a seed replays a run."""
    return [rng.uniform(low, high) for _ in range(rounds)]


# ---------------------------------------------------------------------------------------------
# The counting sink


class _CountingHandler:
    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SinkSMTP, session: SinkSession, envelope: SinkEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # PIPELINING announced (aiosmtpd reads pipelined commands in order either way), so the
        # engine's deliveries are pipelined ones when the kills land.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(
        self, server: SinkSMTP, session: SinkSession, envelope: SinkEnvelope
    ) -> str:
        self.sink._begin()
        try:
            # Slow on purpose: a kill -9 then lands between DATA and our 250 (cancelled here:
            # nothing recorded, the engine must retry) or between our 250 and the engine's
            # bookkeeping (recorded: the retry is a duplicate).
            await asyncio.sleep(self.sink.delay)
            content = envelope.original_content or envelope.content
            data = content if isinstance(content, bytes) else str(content).encode()
            self.sink._record(data, envelope.mail_from or "")
        finally:
            self.sink._end()
        return "250 2.0.0 Ok: counted"


class CountingSink:
    """aiosmtpd on a loopback port in its own thread: counts deliveries per token."""

    def __init__(self, delay: float, host: str = LOOPBACK, size: int = 0) -> None:
        self.delay = delay
        self.size = size
        self.damaged: list[str] = []  # tokens delivered with a body other than the one sent
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._total = 0
        self._dsn = 0
        self._in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="crash-sink", daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._protocols: list[SinkSMTP] = []
        self._error: BaseException | None = None

    # -- counters (called on the sink's loop thread) ------------------------------------------

    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record(self, data: bytes, mail_from: str) -> None:
        headers = _HEADER_END.split(data, maxsplit=1)[0]
        match = _TOKEN.search(headers)
        with self._lock:
            self._total += 1
            if mail_from in ("", "<>"):
                self._dsn += 1
            elif match:
                token = match.group(1).decode("ascii", "replace")
                self._counts[token] += 1
                if not data.endswith(message_body(token, self.size)):
                    self.damaged.append(token)

    # -- views (any thread) ---------------------------------------------------------------------

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    @property
    def dsn_count(self) -> int:
        with self._lock:
            return self._dsn

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # -- lifecycle ------------------------------------------------------------------------------

    def _factory(self) -> SinkSMTP:
        protocol = SinkSMTP(_CountingHandler(self), hostname="sink.bench", loop=self._loop)
        self._protocols.append(protocol)
        return protocol

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_server(self._factory, self.host, 0)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def start(self) -> CountingSink:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise HarnessError(f"sink did not start: {self._error}")
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in self._protocols:
            if isinstance(protocol.transport, asyncio.WriteTransport):
                protocol.transport.abort()
        await asyncio.sleep(0.01)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ---------------------------------------------------------------------------------------------
# The engine under test


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux: every thread's ``children`` list)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(x) for x in (task / "children").read_text().split()]
    return found


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def engine_spec(
    workdir: Path, listen_port: int, sink_port: int, smtp_workers: int = 0
) -> dict[str, object]:
    """Smart host mode straight to the sink: no DNS, no TLS, short retry timers."""
    return {
        "version": 1,
        "host": {"name": "deliverd.bench"},
        "listen": [{"address": LOOPBACK, "port": listen_port}],
        "queue": {"path": str(workdir / "queue")},
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": LOOPBACK, "port": sink_port, "tls": "none"}},
        "retry": {"temp_error_delay": "1s", "interval": "1s", "max_interval": "2s",
                  "expire_after": "1h"},
        "timeouts": {"connect": "2s", "greeting": "5s", "command": "5s",
                     "data_response": "10s", "dns": "2s"},
        "limits": {"connection_failure_cache": "1s", "smtp_workers": smtp_workers},
        "dsn": {"notify_delayed": False},
    }


class EngineProcess:
    """``deliverd run`` as a subprocess on a fixed queue, killed and restarted.

    The listen port is picked free before each start; while the engine is down between rounds
    any other process may take it, so a start that finds it taken renders the config again on
    a fresh port (the queue, which is what matters, stays the same).
    """

    PORT_TRIES = 3

    def __init__(self, workdir: Path, sink_port: int, smtp_workers: int = 0) -> None:
        self.workdir = workdir
        self.sink_port = sink_port
        self.smtp_workers = smtp_workers
        self.queue_path = workdir / "queue"
        self.log_path = workdir / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = 0
        self.config = self._render()

    def _render(self) -> Path:
        self.port = free_port()
        spec = engine_spec(self.workdir, self.port, self.sink_port, self.smtp_workers)
        config, _secrets = write_rendered(normalise(spec), self.workdir / "etc")
        return config

    def start(self, timeout: float) -> float:
        """Start and wait until it listens; returns the seconds that took."""
        began = time.monotonic()
        for _ in range(self.PORT_TRIES - 1):
            try:
                self._start_once(timeout)
                return time.monotonic() - began
            except _PortTaken:
                self.config = self._render()
        self._start_once(timeout)
        return time.monotonic() - began

    def _start_once(self, timeout: float) -> None:
        """Spawn and wait until the daemon wrote its pid file (written once it listens)."""
        if self.running:
            raise HarnessError("engine already running")
        began = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deliverd", "run", "-c", str(self.config),
                 "--log-format", "json", "--log-level", "INFO"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir,
            )
        self.starts += 1
        pid_file = self.queue_path / "deliverd.pid"  # a killed daemon's stale one stays behind
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with self.log_path.open("rb") as f:
                    f.seek(log_offset)
                    if b"address already in use" in f.read():
                        raise _PortTaken
                raise HarnessError(f"deliverd exited {self.proc.returncode} on start "
                                   f"#{self.starts}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text(encoding="ascii")) == self.proc.pid:
                    return
            time.sleep(0.02)
        raise HarnessError(f"deliverd not ready after {timeout:.0f}s:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the daemon alone; its SMTP workers (if any) must notice and exit by
        themselves, which is waited for (they hold the listening socket)."""
        workers = children(self.proc.pid) if self.proc is not None else []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            if time.monotonic() > deadline:
                raise HarnessError(f"SMTP workers {workers} outlived the killed daemon")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def queue_snapshot(self) -> tuple[int, int]:
        """(messages, non-final recipients) read straight from the queue database."""
        try:
            db = QueueDB.open(self.queue_path, create=False)
        except QueueMissingError:
            return 0, 0
        with db:
            messages = db.list_messages()
        pending = sum(1 for m in messages for r in m.recipients if not r.state.is_final)
        return len(messages), pending

    def queue_list(self) -> list[dict[str, object]]:
        """The operator's view: ``deliverd queue -c CFG list --json``."""
        out = subprocess.run(
            [sys.executable, "-m", "deliverd", "queue", "-c", str(self.config), "list", "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if out.returncode != 0:
            raise HarnessError(f"deliverd queue list failed ({out.returncode}): {out.stderr}")
        entries: list[dict[str, object]] = json.loads(out.stdout)
        return entries

    def errors(self) -> list[str]:
        """Every error the engine logged: "message: last exception line", in order."""
        found: list[str] = []
        if not self.log_path.exists():
            return found
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"level": "error"' not in line and '"level": "critical"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                found.append(line[:300])
                continue
            last = str(record.get("exception", "")).strip().splitlines()[-1:]
            found.append(": ".join([str(record.get("message", "")), *last]))
        return found

    def log_tail(self, lines: int = 30) -> str:
        """The last events and problems; routine per-message lines would drown them."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        kept = [line for line in text if not _ROUTINE.search(line)]
        return "\n".join(kept[-lines:])


# ---------------------------------------------------------------------------------------------
# Submitters


class SubmissionLog:
    """Thread-safe record of what each submitter tried and what the listener answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempted: list[str] = []
        self.acknowledged: list[str] = []
        self.rejected: list[str] = []

    def attempt(self, token: str) -> None:
        with self._lock:
            self.attempted.append(token)

    def ack(self, token: str) -> None:
        with self._lock:
            self.acknowledged.append(token)

    def reject(self, token: str) -> None:
        with self._lock:
            self.rejected.append(token)

    def sizes(self) -> tuple[int, int, int]:
        with self._lock:
            return len(self.attempted), len(self.acknowledged), len(self.rejected)


def message_body(token: str, size: int = 0) -> bytes:
    """The body after the header section: the token, ``size`` bytes of filler lines, and a
    last line naming the token, so a truncated or spliced body is noticed."""
    line = (token.encode("ascii") + b" ") * (76 // (len(token) + 1)) + b"\r\n"
    filler = line * (size // len(line))
    return b"\r\n" + f"token {token}\r\n".encode("ascii") + filler + (
        f"end {token}\r\n".encode("ascii") if size else b"")


def message_bytes(token: str, recipient: str, size: int = 0) -> bytes:
    if size:
        head = "\r\n".join([
            f"From: <{SENDER}>", f"To: <{recipient}>", f"Subject: crash harness {token}",
            f"Date: {formatdate(localtime=True)}", f"Message-ID: <{token}@{TOKEN_DOMAIN}>",
        ]).encode("ascii")
        return head + message_body(token, size)
    lines = [
        f"From: <{SENDER}>",
        f"To: <{recipient}>",
        f"Subject: crash harness {token}",
        f"Date: {formatdate(localtime=True)}",
        f"Message-ID: <{token}@{TOKEN_DOMAIN}>",
        "",
        f"token {token}",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


class Submitter(threading.Thread):
    """Streams messages over one reused SMTP session until told to stop or cut off."""

    def __init__(self, name: str, port: int, log: SubmissionLog, stop: threading.Event,
                 interval: float, limit: int, size: int = 0) -> None:
        super().__init__(name=name, daemon=True)
        self.size = size
        self.port = port
        self.log = log
        self.halt = stop
        self.interval = interval
        self.limit = limit

    def run(self) -> None:
        smtp: smtplib.SMTP | None = None
        sent = 0
        next_at = time.monotonic()
        try:
            while not self.halt.is_set() and sent < self.limit:
                if smtp is None:
                    smtp = self._connect()
                    if smtp is None:
                        continue
                token = f"{self.name}-{sent:06d}"
                recipient = f"user{sent % 50}@{RECIPIENT_DOMAIN}"
                sent += 1
                self.log.attempt(token)
                try:
                    smtp.sendmail(SENDER, [recipient], message_bytes(token, recipient, self.size))
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused,
                        smtplib.SMTPDataError):
                    self.log.reject(token)  # a definite refusal: nothing was queued
                except (smtplib.SMTPException, OSError):
                    # Cut off (the kill): unacknowledged. The engine may still have queued it.
                    with contextlib.suppress(Exception):
                        smtp.close()
                    smtp = None
                else:
                    self.log.ack(token)
                next_at = self._pace(next_at)
        finally:
            if smtp is not None:
                with contextlib.suppress(Exception):
                    smtp.close()

    def _connect(self) -> smtplib.SMTP | None:
        try:
            smtp = smtplib.SMTP(LOOPBACK, self.port, timeout=10)
            smtp.ehlo("submitter.bench")
            return smtp
        except (smtplib.SMTPException, OSError):
            self.halt.wait(0.05)  # engine gone: the harness is about to end the round
            return None

    def _pace(self, next_at: float) -> float:
        if self.interval <= 0:
            return next_at
        next_at = max(next_at + self.interval, time.monotonic() - self.interval)
        self.halt.wait(max(0.0, next_at - time.monotonic()))
        return next_at


# ---------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _workdir(options: CrashOptions) -> Iterator[Path]:
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        yield options.workdir
        return
    path = Path(tempfile.mkdtemp(prefix="deliverd-crash-"))
    ok = False
    try:
        yield path
        ok = True
    finally:
        if ok and not options.keep:
            shutil.rmtree(path, ignore_errors=True)


def _round(index: int, engine: EngineProcess, sink: CountingSink, log: SubmissionLog,
           options: CrashOptions, kill_after: float, run_id: str) -> RoundReport:
    began = time.monotonic()
    start_s = engine.start(options.start_timeout)
    before = log.sizes()
    stop = threading.Event()
    interval = options.sessions / options.rate if options.rate > 0 else 0.0
    submitters = [
        Submitter(f"{run_id}r{index:03d}s{n:02d}", engine.port, log, stop, interval,
                  options.max_per_round, options.size)
        for n in range(options.sessions)
    ]
    try:
        for s in submitters:
            s.start()
        time.sleep(kill_after)
        in_flight = sink.in_flight
        sink_total = sink.total
        engine.kill9()
    finally:
        stop.set()
        for s in submitters:
            s.join(30)
    if any(s.is_alive() for s in submitters):
        raise HarnessError(f"round {index}: a submitter did not stop")
    queued, pending = engine.queue_snapshot()
    after = log.sizes()
    attempted, acked, rejected = (a - b for a, b in zip(after, before, strict=True))
    return RoundReport(
        index=index, engine_start_s=round(start_s, 3), kill_after_s=round(kill_after, 3),
        attempted=attempted, acknowledged=acked, unacknowledged=attempted - acked - rejected,
        rejected=rejected, deliveries_in_flight_at_kill=in_flight, sink_total_at_kill=sink_total,
        queued_messages_at_kill=queued, queued_recipients_at_kill=pending,
        round_s=round(time.monotonic() - began, 3),
    )


def _drain(engine: EngineProcess, sink: CountingSink, options: CrashOptions) -> tuple[bool, int]:
    """Run the engine until the queue is empty and the sink count is stable; (drained, left)."""
    engine.start(options.start_timeout)
    deadline = time.monotonic() + options.drain_timeout
    left = -1
    while time.monotonic() < deadline:
        if not engine.running:
            raise HarnessError(f"deliverd died while draining:\n{engine.log_tail()}")
        left = len(engine.queue_list())
        if left == 0:
            seen = sink.total
            time.sleep(options.settle)
            if sink.total == seen and not engine.queue_list():
                return True, 0
        else:
            time.sleep(0.25)
    return False, left


def run_crash(options: CrashOptions) -> CrashReport:
    """The whole run; raises HarnessError when the harness itself could not work."""
    if options.rounds < 1 or options.sessions < 1:
        raise HarnessError("--rounds and --sessions must be at least 1")
    if not 0 < options.kill_min <= options.kill_max:
        raise HarnessError("need 0 < kill_min <= kill_max")
    rng = random.Random(options.seed)
    delays = kill_delays(rng, options.rounds, options.kill_min, options.kill_max)
    run_id = f"{rng.getrandbits(24):06x}"
    began = time.monotonic()
    log = SubmissionLog()
    rounds: list[RoundReport] = []
    with _workdir(options) as workdir:
        sink = CountingSink(options.sink_delay, size=options.size).start()
        engine: EngineProcess | None = None
        try:
            engine = EngineProcess(workdir, sink.port, options.smtp_workers)
            for index, delay in enumerate(delays):
                rounds.append(_round(index, engine, sink, log, options, delay, run_id))
            drain_began = time.monotonic()
            drained, left = _drain(engine, sink, options)
            drain_s = time.monotonic() - drain_began
            engine.stop()
            result = tally(log.attempted, log.acknowledged, log.rejected, sink.counts())
            report = CrashReport(
                options={k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(options).items()},
                tally=result, rounds=rounds, drained=drained, still_queued=left,
                drain_s=drain_s, total_s=time.monotonic() - began, dsn_count=sink.dsn_count,
                workdir=str(workdir) if (options.keep or options.workdir) else None,
                engine_errors=engine.errors(), damaged=list(sink.damaged),
            )
            if not report.ok:
                report.engine_log_tail = engine.log_tail()
            return report
        finally:
            if engine is not None:
                engine.kill9()
            sink.stop()


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Invocation:
    options: CrashOptions
    json_path: Path | None
    quiet: bool


def parse_args(argv: Sequence[str] | None) -> Invocation:
    p = argparse.ArgumentParser(
        prog="bench/crash",
        description="kill -9 the deliverd engine repeatedly under load; fail if an "
                    "acknowledged message is lost.",
    )
    d = CrashOptions()
    p.add_argument("--rounds", type=int, default=d.rounds, help="kill/restart rounds")
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent submitters")
    p.add_argument("--rate", type=float, default=d.rate,
                   help="total submissions per second (0: as fast as possible)")
    p.add_argument("--kill-min", type=float, default=d.kill_min, help="earliest kill, seconds")
    p.add_argument("--kill-max", type=float, default=d.kill_max, help="latest kill, seconds")
    p.add_argument("--sink-delay", type=float, default=d.sink_delay,
                   help="seconds the sink holds each DATA (deliveries in flight at the kill)")
    p.add_argument("--max-per-round", type=int, default=d.max_per_round,
                   help="cap on submissions per session per round")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--seed", type=int, default=None, help="replay the kill instants")
    p.add_argument("--size", type=int, default=0, metavar="BYTES",
                   help="large-message mode: this many filler bytes in each message")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep config, queue and engine log here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", dest="json_path", type=Path, default=None, metavar="PATH",
                   help="write the full result here")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
    p.add_argument("--smtp-workers", type=int, default=d.smtp_workers,
                   help="deliverd limits.smtp_workers (SMTP sessions in worker processes)")
    args = p.parse_args(argv)
    options = CrashOptions(
        rounds=args.rounds, sessions=args.sessions, rate=args.rate, kill_min=args.kill_min,
        kill_max=args.kill_max, sink_delay=args.sink_delay, max_per_round=args.max_per_round,
        drain_timeout=args.drain_timeout, seed=args.seed, size=args.size,
        workdir=args.workdir, keep=args.keep, smtp_workers=args.smtp_workers,
    )
    return Invocation(options, args.json_path, args.quiet)


def format_summary(report: CrashReport, *, quiet: bool = False) -> str:
    t = report.tally
    lines = [] if quiet else [
        f"{'round':>5} {'start_s':>7} {'kill_s':>6} {'acked':>6} {'unacked':>7} "
        f"{'queued':>6} {'dlv_inflight':>12} {'round_s':>7}",
    ]
    for r in [] if quiet else report.rounds:
        lines.append(f"{r.index:>5} {r.engine_start_s:>7.2f} {r.kill_after_s:>6.2f} "
                     f"{r.acknowledged:>6} {r.unacknowledged:>7} {r.queued_messages_at_kill:>6} "
                     f"{r.deliveries_in_flight_at_kill:>12} {r.round_s:>7.2f}")
    lines.append(
        f"acknowledged={t.acknowledged} delivered={t.delivered_unique} "
        f"duplicates={t.duplicates} lost={len(t.lost)} "
        f"unacknowledged={t.unacknowledged} unacknowledged_delivered={t.unacknowledged_delivered} "
        f"rejected={t.rejected} dsn={report.dsn_count} drained={report.drained} "
        f"engine_errors={len(report.engine_errors)} "
        f"drain_s={report.drain_s:.1f} total_s={report.total_s:.1f}"
    )
    if t.lost:
        lines.append("LOST (acknowledged, never delivered): " + " ".join(t.lost[:20]))
    if t.unknown_delivered:
        lines.append("delivered but never submitted: " + " ".join(t.unknown_delivered[:20]))
    if report.damaged:
        lines.append("DAMAGED (body not as submitted): " + " ".join(report.damaged[:20]))
    if not report.drained:
        lines.append(f"queue not drained: {report.still_queued} messages left")
    for line in report.engine_errors[:5]:
        lines.append(f"engine error: {line}")
    if report.engine_log_tail:
        lines.append("engine log (tail):\n" + report.engine_log_tail)
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C: the finally blocks stop every process.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    try:
        call = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and the
    # harness must still clean up when a supervisor interrupts it.
    previous = {sig: signal.signal(sig, _raise_interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = run_crash(call.options)
    except HarnessError as exc:
        print(f"crash: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except KeyboardInterrupt:
        print("crash: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if call.json_path is not None:
        call.json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n",
                                  encoding="utf-8")
    print(format_summary(report, quiet=call.quiet))
    return EXIT_OK if report.ok else EXIT_LOST
