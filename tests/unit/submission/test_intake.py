"""One way into the queue: every source goes through ``Intake.admit`` and gets the same rules.

Each source is walked with the same message (four ``Received:`` fields, over a hop limit of 3;
``From:`` a domain with a DKIM key): the SMTP listener, the SMTP workers' link, the maildrop's
pickup (what ``sendmail`` leaves while the daemon runs) and ``deliverd send``. Each must be
seen by ``admit``, be held as a mail loop, and carry a signature a verifier accepts below its
own trace header. The notices the engine writes (a DSN, a TLS report) enter the same way.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import dkim
import pytest

from deliverd.cli.main import main
from deliverd.config.loader import load_config
from deliverd.config.model import Config, DkimKey
from deliverd.core.outcomes import Kind, Outcome
from deliverd.dkim.keys import load_key
from deliverd.queue.database import QueueDB
from deliverd.queue.message import NewMessage
from deliverd.queue.spool import BodySpool
from deliverd.queue.store import QueueStore
from deliverd.reports.dsn import DsnKind
from deliverd.reports.notices import Notices
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered
from deliverd.submission.cleanup import Arrival, Intake
from deliverd.submission.gate import InboundGate
from deliverd.submission.handoff import QueueLink, serve_link
from deliverd.submission.listener import start_listeners
from deliverd.submission.maildrop import DropEnvelope, prepare, write_drop
from deliverd.submission.pickup import Pickup
from tests.fixtures import paths

pytestmark = pytest.mark.integration

DKNEWKEY = str(Path(sys.executable).with_name("dknewkey"))
SENDER = "alice@example.com"
RECIPIENT = "bob@elsewhere.test"
HOPS = 4  # one more than the spec's limits.max_hops
MESSAGE = b"".join(
    [b"Received: from hop%d.test by hop%d.test; Mon, 30 Nov 2026 20:00:00 +0000\r\n" % (n, n)
     for n in range(HOPS)]
) + (b"From: Alice <alice@example.com>\r\nTo: bob@elsewhere.test\r\n"
     b"Subject: one way in\r\nMessage-ID: <intake@example.com>\r\n\r\nThe body.\r\n")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("intake-keys")
    subprocess.run([DKNEWKEY, "intake"], cwd=directory, check=True, capture_output=True)
    return str(directory / "intake.key")


@pytest.fixture
def config_path(tmp_path: Path, key_file: str) -> Path:
    spec = {
        "version": 1,
        "host": {"name": "mx.example.com"},
        "queue": {"path": str(tmp_path / "queue")},
        "listen": [{"address": "127.0.0.1", "port": 2525}],
        "limits": {"max_hops": 3},
        "tls_reports": {"enabled": True, "sender": "tlsrpt@example.com"},
        "dkim": [{"domain": "example.com", "selector": "intake", "key_file": key_file}],
    }
    path, _ = write_rendered(normalise(spec), tmp_path / "etc")
    return path


@pytest.fixture
def cfg(config_path: Path) -> Config:
    return load_config(config_path)


@pytest.fixture
def admitted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The source of every message ``Intake.admit`` took, in order."""
    seen: list[str] = []
    admit = Intake.admit

    async def spy(self: Intake, arrival: Arrival, body: object) -> str:
        seen.append(arrival.source)
        return await admit(self, arrival, body)  # type: ignore[arg-type]

    monkeypatch.setattr(Intake, "admit", spy)
    return seen


def _no_wake(_queue_id: str, _source: str) -> None:
    pass


# -- the sources --------------------------------------------------------------------------------


async def _over_smtp(cfg: Config, message: bytes, *, linked: bool) -> None:
    store = await QueueStore.open(cfg.queue.path)
    intake = Intake(store, lambda: cfg, _no_wake)
    listening = replace_port(cfg)
    async with contextlib.AsyncExitStack() as stack:
        if linked:  # the listener as an SMTP worker runs it, its link served by the daemon
            ours, theirs = socket.socketpair()
            d_reader, d_writer = await asyncio.open_unix_connection(sock=ours)
            w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
            link = QueueLink(w_reader, w_writer, cfg.queue.path)
            tasks = [asyncio.create_task(link.run()), asyncio.create_task(serve_link(
                d_reader, d_writer, intake, InboundGate(), lambda: (100, 20), lambda: None))]
            stack.push_async_callback(asyncio.gather, *tasks, return_exceptions=True)
            stack.callback(w_writer.close)
            servers = await start_listeners(listening, link, gate=link)
        else:
            servers = await start_listeners(listening, intake)
        for server in servers:
            stack.callback(server.close)
        port = servers[0].sockets[0].getsockname()[1]
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
        await smtp.connect()
        await smtp.sendmail(SENDER, [RECIPIENT], message)
        await smtp.quit()
    await store.close()


def replace_port(cfg: Config) -> Config:
    """``cfg`` listening on a port the kernel picks."""
    return replace(cfg, listen=(replace(cfg.listen[0], port=0),))


async def _by_pickup(cfg: Config, message: bytes) -> None:
    path = Path(cfg.queue.path)
    store = await QueueStore.open(path)
    prepare(path)
    write_drop(path, DropEnvelope(SENDER, (RECIPIENT,)), [message], min_free=0)
    assert await Pickup(path, store, Intake(store, lambda: cfg, _no_wake)).scan() == 1
    await store.close()


def smtp(cfg: Config, _config_path: Path, message: bytes) -> None:
    asyncio.run(_over_smtp(cfg, message, linked=False))


def smtp_worker(cfg: Config, _config_path: Path, message: bytes) -> None:
    asyncio.run(_over_smtp(cfg, message, linked=True))


def maildrop(cfg: Config, _config_path: Path, message: bytes) -> None:
    asyncio.run(_by_pickup(cfg, message))


def send(_cfg: Config, config_path: Path, message: bytes) -> None:
    """``deliverd send`` run in this process (so ``admit`` is seen), its message from a file."""
    path = config_path.parent / "message.eml"
    path.write_bytes(message)
    assert main(["send", "-c", str(config_path), "--from", SENDER, "--to", RECIPIENT,
                 str(path)]) == 0


SOURCES: dict[str, tuple[Callable[[Config, Path, bytes], None], str]] = {
    "smtp": (smtp, "listener"),
    "smtp_worker": (smtp_worker, "listener"),
    "maildrop": (maildrop, "sendmail"),
    "send": (send, "send"),
}


def _queued(cfg: Config) -> Iterator[tuple[str | None, bytes]]:
    with QueueDB.open(cfg.queue.path, create=False) as db:
        for message in db.list_messages():
            yield message.hold_reason, db.read_data(message.queue_id)


def _dns(key_file: str, selector: str = "intake") -> Callable[..., bytes | None]:
    key = load_key(DkimKey("example.com", selector, key_file))
    records = {f"{key.record_name}.".encode(): key.txt_value().encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


# -- every source, the same rules ---------------------------------------------------------------


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_source_goes_through_admit_and_gets_the_hop_limit_and_dkim(
    source: str, cfg: Config, config_path: Path, key_file: str, admitted: list[str],
) -> None:
    submit, way = SOURCES[source]
    submit(cfg, config_path, MESSAGE)
    assert admitted == [way]
    [(hold_reason, data)] = list(_queued(cfg))
    assert hold_reason == f"mail loop: {HOPS} hops"
    assert data.startswith(b"Received: ")  # the trace header first, above the signature
    trace_end = data.index(b"\r\nDKIM-Signature:") + 2
    assert b"Received:" not in data[trace_end:trace_end + 16]
    assert dkim.verify(data, dnsfunc=_dns(key_file))
    assert data.endswith(b"\r\n\r\nThe body.\r\n")


def test_a_message_under_the_hop_limit_is_not_held_from_any_source(
    cfg: Config, config_path: Path, admitted: list[str],
) -> None:
    at_the_limit = MESSAGE.split(b"\r\n", 1)[1]  # one Received: field fewer: three
    for submit, _way in SOURCES.values():
        submit(cfg, config_path, at_the_limit)
    assert admitted == ["listener", "listener", "sendmail", "send"]
    assert [reason for reason, _ in _queued(cfg)] == [None] * 4


# -- notices ----------------------------------------------------------------------------------


async def test_notices_enter_through_admit_signed_and_traced(
    cfg: Config, key_file: str, admitted: list[str],
) -> None:
    store = await QueueStore.open(cfg.queue.path)
    woken: list[tuple[str, str]] = []
    intake = Intake(store, lambda: cfg, lambda qid, source: woken.append((qid, source)))
    notices = Notices(intake)
    try:
        original = await store.enqueue(NewMessage(SENDER, [RECIPIENT], MESSAGE))
        queued = await store.get(original)
        assert queued is not None
        failed = Outcome(RECIPIENT, Kind.BOUNCED, "5.1.1", "smtp; 550 5.1.1 no such user")
        [dsn_id] = await notices.dsns(DsnKind.FAILURE, queued, MESSAGE, [(SENDER, [failed])],
                                      retry_until=datetime.now(UTC))
        report_id = await notices.tls_report("policy.test", "2026-11-30", [],
                                             ["reports@policy.test"])
        dsn, dsn_data = await store.get(dsn_id), await store.read_data(dsn_id)
        report_data = await store.read_data(report_id)
    finally:
        await store.close()
    assert admitted == ["notice", "notice"]
    assert woken == [(dsn_id, "notice"), (report_id, "notice")]
    assert dsn is not None and dsn.is_dsn and dsn.sender == ""
    for data in (dsn_data, report_data):
        assert data.startswith(b"Received: by mx.example.com (deliverd notice)")
        assert dkim.verify(data, dnsfunc=_dns(key_file))


# -- bytes and DATA lines are judged alike -------------------------------------------------------


@pytest.mark.parametrize("message", [
    MESSAGE,
    MESSAGE.replace(b"\r\n", b"\n"),  # a file with LF line ends
    b"From: root\nTo: bob\n\n" + (b"x" * 70_000 + b"\n\xc3\xa9 bare\nline\r\n") * 40,
    b"Subject: no body",
])
def test_a_message_written_from_bytes_is_judged_as_its_data_lines(
    message: bytes, cfg: Config,
) -> None:
    intake = Intake(_NoQueue(), lambda: cfg, _no_wake)
    body, written = intake.take("Q1", b"Received: trace\r\n", message)
    fed = intake.receive("Q1", b"Received: trace\r\n")
    for line in message.splitlines(keepends=True):
        fed.feed(line if line.endswith(b"\r\n") else line.rstrip(b"\n") + b"\r\n")
    as_lines = fed.done()
    expected = as_lines.getvalue()
    if not message.endswith(b"\n"):  # DATA always ends a line; a file need not
        expected = expected.removesuffix(b"\r\n")
    assert (body.getvalue(), written) == (expected, fed.written())
    body.close()
    as_lines.close()


class _NoQueue:
    def spool(self) -> BodySpool:
        return BodySpool()

    def free_bytes(self) -> int:
        return 1 << 40

    async def enqueue(self, message: NewMessage) -> str:
        raise AssertionError("nothing is queued here")


def test_only_the_intake_calls_the_queues_enqueue() -> None:
    """A second path into the queue would be a way around every intake rule."""
    engine = paths.REPO / "engine" / "deliverd"
    callers = set()
    for path in engine.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "enqueue"):
                callers.add(str(path.relative_to(engine)))
    # queue/store.py drives QueueDB.enqueue from its writer thread, for the intake's calls
    assert callers == {"submission/cleanup.py", "queue/store.py"}
