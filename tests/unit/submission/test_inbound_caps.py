"""Inbound session caps: real TCP clients from distinct loopback addresses against a real
listener. Beyond ``limits.max_inbound_sessions`` / ``max_inbound_per_client`` a new connection
gets ``421 4.3.2`` and is closed; the others are served."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import uvloop

from deliverd.config.model import Config, DsnConfig, HostConfig, LimitsConfig, Listener
from deliverd.ops.metrics import Metrics
from deliverd.queue.store import QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.gate import InboundGate
from deliverd.submission.listener import start_listeners

pytestmark = pytest.mark.integration

LISTEN = "127.0.0.90"
MESSAGE = b"From: app@example.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
OnLoop = Callable[[Coroutine[Any, Any, None]], None]


class Listening:
    def __init__(self, port: int, metrics: Metrics, enqueued: list[str]) -> None:
        self.port = port
        self.metrics = metrics
        self.enqueued = enqueued
        self.open: list[Conn] = []

    async def connect(self, source: str) -> bytes:
        """Open a connection from ``source`` and keep it open (idle); its first reply line."""
        reader, writer = await asyncio.open_connection(
            LISTEN, self.port, local_addr=(source, 0))
        self.open.append((reader, writer))
        return await asyncio.wait_for(reader.readline(), 10)

    async def close_all(self) -> None:
        for _, writer in self.open:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self.open.clear()


@pytest.fixture(params=["asyncio", "uvloop"])
def on_loop(request: pytest.FixtureRequest) -> OnLoop:
    """Runs a test's body on asyncio's loop and on uvloop (the daemon's loop when the ``fast``
    extra is installed, as the role does by default): their transports differ in when they
    call back."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(body: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(body)

    return run


@contextlib.asynccontextmanager
async def started(tmp_path: Path) -> AsyncIterator[Listening]:
    store = await QueueStore.open(tmp_path / "queue")
    cfg = Config(
        host=HostConfig("mx.deliverd.test"),
        dsn=DsnConfig("postmaster@mx.deliverd.test"),
        listen=(Listener(LISTEN, 0, ()),),
        limits=LimitsConfig(),  # the defaults: 100 sessions, 20 per client
    )
    metrics = Metrics()
    enqueued: list[str] = []
    intake = Intake(store, lambda: cfg, lambda qid, _source: enqueued.append(qid))
    servers = await start_listeners(cfg, intake,
                                    gate=InboundGate(on_refused=metrics.inbound_refused_by))
    running = Listening(servers[0].sockets[0].getsockname()[1], metrics, enqueued)
    try:
        yield running
    finally:
        await running.close_all()
        for server in servers:
            server.close()
            await server.wait_closed()
        await store.close()


def test_defaults_are_100_sessions_and_20_per_client() -> None:
    assert LimitsConfig().max_inbound_sessions == 100
    assert LimitsConfig().max_inbound_per_client == 20


def test_gate_counts_and_releases() -> None:
    gate = InboundGate()
    assert gate.admit("a", 2, 1) is None
    assert gate.admit("a", 2, 1) == "max_inbound_per_client"
    assert gate.admit("b", 2, 1) is None
    assert gate.admit("c", 2, 1) == "max_inbound_sessions"
    gate.release("a")
    assert gate.admit("c", 2, 1) is None
    assert gate.total == 2 and gate.per_client == {"b": 1, "c": 1}


def test_the_101st_of_150_idle_connections_gets_421(
    on_loop: OnLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with started(tmp_path) as listening:
            caplog.set_level(logging.WARNING, "deliverd.submission.listener")
            replies = []
            for n in range(150):  # 8 source addresses, at most 19 each: under the per-client cap
                replies.append(await listening.connect(f"127.0.0.{91 + n % 8}"))
            assert all(r.startswith(b"220 ") for r in replies[:100])
            assert all(r.startswith(b"421 4.3.2 ") for r in replies[100:]), replies[100:]
            # A refused connection is closed by the server.
            for reader, _ in listening.open[100:]:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            assert listening.metrics.value(
                "deliverd_inbound_refused_total", reason="max_inbound_sessions") == 50
            said = [r.getMessage() for r in caplog.records]
            assert sum("max_inbound_sessions reached" in m for m in said) == 50
            # The first 100 are still served; one closing frees its place.
            reader, writer = listening.open[0]
            writer.write(b"NOOP\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250")
            writer.write(b"QUIT\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"221")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            await asyncio.sleep(0.1)
            assert (await listening.connect("127.0.0.99")).startswith(b"220 ")
            assert (await listening.connect("127.0.0.99")).startswith(b"421 4.3.2 ")

    on_loop(body())


def test_one_client_gets_421_from_its_21st_and_others_still_send(
    on_loop: OnLoop, tmp_path: Path,
) -> None:
    async def body() -> None:
        async with started(tmp_path) as listening:
            replies = [await listening.connect("127.0.0.98") for _ in range(30)]
            assert all(r.startswith(b"220 ") for r in replies[:20])
            assert all(r.startswith(b"421 4.3.2 ") for r in replies[20:]), replies[20:]
            assert listening.metrics.value(
                "deliverd_inbound_refused_total", reason="max_inbound_per_client") == 10
            smtp = aiosmtplib.SMTP(hostname=LISTEN, port=listening.port, start_tls=False,
                                   local_hostname="client.test", timeout=10,
                                   source_address=("127.0.0.97", 0))
            await smtp.connect()
            await smtp.ehlo()
            await smtp.mail("app@example.test")
            await smtp.rcpt("user@example.test")
            code, _ = await smtp.data(MESSAGE)
            await smtp.quit()
            assert code == 250
            assert len(listening.enqueued) == 1

    on_loop(body())


def test_clients_that_connect_and_close_at_once_leave_no_place_taken(
    on_loop: OnLoop, tmp_path: Path,
) -> None:
    """A TCP health check (connect, close, read nothing) 30 times from one address: each
    closed connection gives its place back, so the client's 20 places are all there after."""
    async def body() -> None:
        async with started(tmp_path) as listening:
            for _ in range(30):
                _, writer = await asyncio.open_connection(LISTEN, listening.port,
                                                          local_addr=("127.0.0.96", 0))
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await asyncio.sleep(0.2)
            replies = [await listening.connect("127.0.0.96") for _ in range(21)]
            assert all(r.startswith(b"220 ") for r in replies[:20]), replies
            assert replies[20].startswith(b"421 4.3.2 ")

    on_loop(body())
