"""``limits.smtp_workers``: the SMTP sessions in worker processes, the queue in the daemon.

A real ``deliverd run`` with workers, real SMTP clients, a real sink: mail taken by a worker is
queued by the daemon (250 only after its commit) and delivered; the session caps count every
worker's sessions; a killed worker is replaced; a reload starts new workers while the old ones
finish their sessions; the workers go when the daemon goes, by SIGTERM or by SIGKILL. The
link itself (chunked bodies, a failing queue, a daemon gone mid-DATA) is tested in-process
against the real listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from bench.crash_harness import children

from deliverd.config.model import Config, DsnConfig, HostConfig, LimitsConfig, Listener
from deliverd.queue.store import QueueStore, new_queue_id
from deliverd.submission.cleanup import Arrival, Intake
from deliverd.submission.gate import InboundGate
from deliverd.submission.handoff import INLINE_BODY, QueueLink, frame, read_frame, serve_link
from deliverd.submission.incoming import Written
from deliverd.submission.listener import start_listeners
from tests.fixtures import sdbox
from tests.fixtures.engine import Engine
from tests.fixtures.smtp_sink import Sink

pytestmark = pytest.mark.integration

SENDER = "app@example.test"


def worker_spec(sink_port: int, workers: int = 2, **limits: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none"}},
        "dsn": {"notify_delayed": False},
        "limits": {"smtp_workers": workers, **limits},
    }


def workers_of(engine: Engine) -> list[int]:
    assert engine.proc is not None
    return [pid for pid in children(engine.proc.pid)
            if b"deliverd.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    sdbox.wait_until(predicate, what, timeout, poll=0.05)


def idle_connection(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock, sock.recv(512)


def test_workers_take_the_mail_the_daemon_queues_and_delivers_it(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink()
    metrics = f"127.0.0.1:{_free_port()}"
    engine = engine_factory({**worker_spec(sink.port), "metrics": {"listen": metrics}})
    engine.wait_ready()
    pids = workers_of(engine)
    assert len(pids) == 2, engine.log_text()
    assert engine.log_text().count("accepting") == 2
    ids = [engine.submit(SENDER, [f"user{n}@example.net"]) for n in range(12)]
    wait_until(lambda: len(sink.messages) == 12, "12 deliveries")
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
        f"user{n}@example.net" for n in range(12))
    # The Received: field the worker wrote names the queue id the daemon acknowledged.
    assert all(any(qid.encode() in m.data for m in sink.messages) for qid in ids)
    assert 'deliverd_messages_received_total{way="listener"} 12.0' in engine.scrape()
    assert engine.stop() == 0
    wait_until(lambda: all(gone(pid) for pid in pids), "the workers to end with the daemon")


def test_a_large_message_crosses_the_link_in_chunks_and_arrives_whole(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink()
    engine = engine_factory(worker_spec(sink.port, workers=1))
    line = "x" * 76 + "\r\n"
    body = line * (3 * 1024 * 1024 // len(line))  # 3 MiB: twelve chunks over the link
    engine.submit(SENDER, ["big@example.net"], body=body)
    wait_until(lambda: len(sink.messages) == 1, "the delivery", timeout=30)
    delivered = sink.messages[0].data
    assert hashlib.sha256(delivered[delivered.index(b"\r\n\r\n") + 4:]).hexdigest() == \
        hashlib.sha256(body.encode()).hexdigest()


def test_the_session_caps_count_the_sessions_of_every_worker(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink()
    metrics = f"127.0.0.1:{_free_port()}"
    engine = engine_factory({**worker_spec(sink.port, workers=3, max_inbound_per_client=4),
                             "metrics": {"listen": metrics}})
    engine.wait_ready()
    held = [idle_connection(engine.port, "127.0.0.61") for _ in range(4)]
    assert all(greeting.startswith(b"220 ") for _, greeting in held)
    extra, greeting = idle_connection(engine.port, "127.0.0.61")
    assert greeting.startswith(b"421 4.3.2 "), greeting  # 4 in all, whichever worker has them
    extra.close()
    assert 'deliverd_inbound_refused_total{reason="max_inbound_per_client"} 1.0' in engine.scrape()
    other, greeting = idle_connection(engine.port, "127.0.0.62")
    assert greeting.startswith(b"220 ")  # another client still gets in
    other.close()
    held[0][0].close()  # one closes: its place is free again
    wait_until(lambda: idle_connection(engine.port, "127.0.0.61")[1].startswith(b"220 "),
               "the freed place")
    for sock, _ in held[1:]:
        sock.close()


def test_a_killed_worker_is_replaced_and_the_mail_goes_on(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink()
    metrics = f"127.0.0.1:{_free_port()}"
    engine = engine_factory({**worker_spec(sink.port, workers=1), "metrics": {"listen": metrics}})
    engine.wait_ready()
    assert "deliverd_smtp_worker_exits_total 0.0" in engine.scrape()
    (first,) = workers_of(engine)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: workers_of(engine) and workers_of(engine) != [first],
               "a new worker")
    wait_until(lambda: engine.log_text().count("accepting") == 2, "the new worker accepting")
    assert "starting another" in engine.log_text()
    assert "deliverd_smtp_worker_exits_total 1.0" in engine.scrape()
    engine.submit(SENDER, ["after@example.net"])
    wait_until(lambda: len(sink.messages) == 1, "the delivery")


def test_a_reload_starts_new_workers_and_an_open_session_finishes_on_the_old_one(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    first, second = smtp_sink(), smtp_sink()
    engine = engine_factory(worker_spec(first.port, workers=1))
    engine.wait_ready()
    (old,) = workers_of(engine)
    with smtplib.SMTP("127.0.0.1", engine.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        engine.reconfigure(worker_spec(second.port, workers=1))
        engine.signal(signal.SIGHUP)
        engine.wait_for(lambda: "reloaded" in engine.log_text(), what="reload")
        assert old in workers_of(engine) or not gone(old)
        # The session opened before the reload goes on in the old worker, and the daemon
        # routes its message with the new config.
        smtp.sendmail(SENDER, ["during@example.net"], b"Subject: during\r\n\r\nHi.\r\n")
    wait_until(lambda: gone(old), "the old worker to end once its session did")
    (new,) = workers_of(engine)
    assert new != old
    engine.submit(SENDER, ["after@example.net"])
    wait_until(lambda: len(second.messages) == 2, "both deliveries to the new smart host")
    assert not first.messages


def test_the_workers_end_when_the_daemon_is_killed_and_a_restart_listens_again(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink(stall={"dot": 30})  # deliveries hang: what was acknowledged stays queued
    engine = engine_factory(worker_spec(sink.port))
    engine.wait_ready()
    pids = workers_of(engine)
    queued = engine.submit(SENDER, ["kept@example.net"])
    engine.kill9()
    wait_until(lambda: all(gone(pid) for pid in pids), "the workers to notice and exit")
    sink.stop()
    healthy = smtp_sink()
    engine.reconfigure(worker_spec(healthy.port))
    engine.start()
    wait_until(lambda: len(healthy.messages) == 1, "the acknowledged message delivered")
    assert queued.encode() in healthy.messages[0].data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the link, in-process, against the real listener -------------------------------------------


class _FailingStore:
    """Stands for a ``QueueStore`` whose commit fails (disk full): only what serve_link uses."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def spool(self) -> Any:
        from deliverd.queue.spool import BodySpool
        return BodySpool(self.path)

    async def enqueue(self, *args: Any, **kwargs: Any) -> str:
        raise OSError("database or disk is full")


@contextlib.asynccontextmanager
async def linked_listener(tmp_path: Path, store: Any) -> AsyncIterator[tuple[int, Any]]:
    """The listener as a worker runs it, linked over a socketpair to ``serve_link``."""
    ours, theirs = socket.socketpair()
    d_reader, d_writer = await asyncio.open_unix_connection(sock=ours)
    w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
    (tmp_path / "queue").mkdir(exist_ok=True)
    link = QueueLink(w_reader, w_writer, str(tmp_path / "queue"))
    reading = asyncio.create_task(link.run())
    enqueued: list[str] = []
    cfg = Config(host=HostConfig("mx.deliverd.test"), dsn=DsnConfig("postmaster@x.test"),
                 listen=(Listener("127.0.0.1", 0, ()),), limits=LimitsConfig())
    intake = Intake(store, lambda: cfg, lambda qid, _source: enqueued.append(qid))
    serving = asyncio.create_task(serve_link(
        d_reader, d_writer, intake, InboundGate(), lambda: (100, 20), lambda: None))
    servers = await start_listeners(cfg, link, gate=link)
    try:
        yield servers[0].sockets[0].getsockname()[1], (enqueued, d_writer)
    finally:
        for server in servers:
            server.close()
        d_writer.close()
        for task in (reading, serving):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _send(port: int, body: bytes) -> tuple[int, bytes]:
    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail(SENDER)
            smtp.rcpt("user@example.net")
            code, msg = smtp.data(body)
            return code, msg
    return await asyncio.to_thread(run)


async def test_the_link_queues_inline_and_chunked_bodies_through_the_real_store(
    tmp_path: Path,
) -> None:
    store = await QueueStore.open(tmp_path / "queue")
    try:
        async with linked_listener(tmp_path, store) as (port, (enqueued, _)):
            small = b"Subject: small\r\n\r\nHello.\r\n"
            big = b"Subject: big\r\n\r\n" + b"y" * 76 + b"\r\n" * 1
            big = big + (b"z" * 998 + b"\r\n") * (2 * INLINE_BODY // 1000 + 5)
            for body in (small, big):
                code, msg = await _send(port, body)
                assert code == 250, msg
            assert len(enqueued) == 2
            stored = [await store.read_data(qid) for qid in enqueued]
            assert stored[0].endswith(small) and stored[1].endswith(big)
    finally:
        await store.close()


async def test_a_failing_queue_makes_the_worker_answer_452_and_keeps_the_session(
    tmp_path: Path,
) -> None:
    async with linked_listener(tmp_path, _FailingStore(tmp_path / "queue")) as (port, _):
        code, msg = await _send(port, b"Subject: x\r\n\r\nHello.\r\n")
        assert code == 452, msg


async def test_a_daemon_gone_before_the_commit_gets_no_250(tmp_path: Path) -> None:
    store = await QueueStore.open(tmp_path / "queue")
    try:
        async with linked_listener(tmp_path, store) as (port, (enqueued, d_writer)):
            def session() -> tuple[int, bytes]:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.ehlo("client.test")
                    smtp.mail(SENDER)
                    smtp.rcpt("user@example.net")
                    asyncio.run_coroutine_threadsafe(_close(d_writer), loop).result(10)
                    time.sleep(0.2)
                    code, msg = smtp.data(b"Subject: x\r\n\r\nHello.\r\n")
                    return code, msg

            loop = asyncio.get_running_loop()
            code, msg = await asyncio.to_thread(session)
            assert code // 100 == 4, (code, msg)
            assert enqueued == []
            # A new connection now is turned away at once, not left hanging.
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
            assert refused.value.smtp_code == 421
    finally:
        await store.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()


def test_reloads_move_the_sessions_into_workers_and_back_on_the_same_port(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    sink = smtp_sink()
    engine = engine_factory(worker_spec(sink.port, workers=0))
    engine.wait_ready()
    assert workers_of(engine) == []
    engine.submit(SENDER, ["in-process@example.net"])
    for n, workers in enumerate((2, 0), start=1):
        engine.reconfigure(worker_spec(sink.port, workers=workers))
        engine.signal(signal.SIGHUP)
        engine.wait_for(lambda n=n: engine.log_text().count("reloaded") == n, what="reload")
        wait_until(lambda workers=workers: len(workers_of(engine)) == workers,
                   f"{workers} workers")
        engine.submit(SENDER, [f"after-reload-{n}@example.net"])
    wait_until(lambda: len(sink.messages) == 3, "three deliveries")
    assert "reload refused" not in engine.log_text()


async def test_a_chunked_body_the_worker_abandons_is_dropped_not_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames as a worker sends them when its session goes away between chunks."""
    caplog.set_level(logging.WARNING, "deliverd.submission.handoff")
    store = await QueueStore.open(tmp_path / "queue")
    ours, theirs = socket.socketpair()
    d_reader, d_writer = await asyncio.open_unix_connection(sock=ours)
    w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
    enqueued: list[str] = []
    cfg = Config(host=HostConfig("mx.deliverd.test"), dsn=DsnConfig("postmaster@x.test"))
    intake = Intake(store, lambda: cfg, lambda qid, _source: enqueued.append(qid))
    serving = asyncio.create_task(serve_link(
        d_reader, d_writer, intake, InboundGate(), lambda: (100, 20), lambda: None))
    try:
        for rid, last in ((1, ("abort", 1)), (2, ("end", 2))):
            arrival = Arrival(SENDER, ("user@example.net",), Written(new_queue_id(), 0, 0, False),
                              "client=[192.0.2.1]", "listener")
            w_writer.write(frame(("enqueue", rid, arrival, None)))
            w_writer.write(frame(("chunk", rid, b"Subject: x\r\n\r\n" + b"y" * 300_000)))
            w_writer.write(frame(last))
        assert await asyncio.wait_for(read_frame(w_reader), 10) == ("queued", 2, enqueued[0])
        assert [m.queue_id for m in await store.list_messages()] == enqueued
        assert caplog.records == []  # the abort understood, not "unknown frame"
    finally:
        w_writer.close()
        await asyncio.wait_for(serving, 10)
        await store.close()
