"""Bodies of any size in bounded pieces: the queue's chunked storage, and the listener
streaming DATA into it (a real aiosmtplib client against a real listener and queue)."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from deliverd.config.model import Config, DsnConfig, HostConfig, LimitsConfig, Listener
from deliverd.queue.database import DB_NAME, QueueDB
from deliverd.queue.message import NewMessage
from deliverd.queue.store import BODY_CHUNK, BodySpool, QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.listener import start_listeners

LISTEN = "127.0.0.91"


def big_message(size: int, *, seed: int = 17, eightbit: bool = False) -> bytes:
    """A message of about ``size`` bytes: CRLF lines of varied length, some starting with a
    dot (dot-stuffed on the wire), one a lone dot, none longer than 998 bytes."""
    rng = random.Random(seed)
    lines = [b"From: app@example.test", b"To: user@example.test", b"Subject: big", b""]
    total = 0
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 +/="
    while total < size:
        n = rng.choice((0, 1, 40, 76, 76, 76, 500, 998))
        line = bytes(rng.choice(alphabet) for _ in range(min(n, 60))) * (n // 60 + 1)
        line = line[:n]
        if rng.random() < 0.05:
            line = b"." + line[:997]
        lines.append(line)
        total += len(line) + 2
    lines.insert(len(lines) // 2, b".")
    if eightbit:
        lines.append("caf\u00e9".encode())  # 8-bit only near the end, far beyond the first chunk
    return b"\r\n".join(lines) + b"\r\n"


# -- the queue ---------------------------------------------------------------------------------


def test_a_spooled_body_is_stored_in_chunks_and_read_back_whole(tmp_path: Path) -> None:
    data = big_message(3 * BODY_CHUNK + 12345)
    with QueueDB.open(tmp_path) as db:
        spool = BodySpool(tmp_path)
        for start in range(0, len(data), 70_000):
            spool.write(data[start:start + 70_000])
        assert not spool.in_memory
        qid = db.enqueue(NewMessage("a@example.test", ["b@example.test"], spool))
        spool.close()
        chunks = list(db.iter_body(qid))
        assert [len(c) for c in chunks[:-1]] == [BODY_CHUNK] * (len(chunks) - 1)
        assert b"".join(chunks) == data == db.read_data(qid)
        assert db.read_many([qid]) == {qid: data}
        message = db.get(qid)
        assert message is not None and message.size == len(data)
        small = db.enqueue(NewMessage(
            "a@example.test", ["b@example.test"], b"Subject: s\r\n\r\nx\r\n"))
        assert list(db.iter_body(small)) == [b"Subject: s\r\n\r\nx\r\n"]
        assert db.delete(qid)
        with pytest.raises(KeyError):
            list(db.iter_body(qid))
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM body_chunks").fetchone() == (0,)


def test_a_version_1_queue_gains_the_chunk_table_and_keeps_its_bodies(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path) as db:
        qid = db.enqueue(NewMessage(
            "a@example.test", ["b@example.test"], b"Subject: old\r\n\r\nx\r\n"))
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # what version 1 left on disk
        conn.execute("DROP TABLE body_chunks")
        conn.execute("PRAGMA user_version = 1")
    with QueueDB.open(tmp_path) as db:
        assert db.read_data(qid) == b"Subject: old\r\n\r\nx\r\n"
        spool = BodySpool(tmp_path)
        spool.write(b"x" * (BODY_CHUNK + 1))
        big = db.enqueue(NewMessage("a@example.test", ["b@example.test"], spool))
        assert db.read_data(big) == b"x" * (BODY_CHUNK + 1)


async def test_the_store_streams_a_body_chunk_by_chunk(tmp_path: Path) -> None:
    data = big_message(2 * BODY_CHUNK + 1)
    store = await QueueStore.open(tmp_path)
    try:
        spool = store.spool()
        spool.write(data)
        qid = await store.enqueue(NewMessage("a@example.test", ["b@example.test"], spool))
        spool.close()
        chunks = [c async for c in store.body_chunks(qid)]
        assert len(chunks) == 3 and b"".join(chunks) == data
        with pytest.raises(KeyError):
            [c async for c in store.body_chunks("NOSUCHID0000000")]
    finally:
        await store.close()


# -- the listener --------------------------------------------------------------------------------


@pytest.fixture
async def listening(tmp_path: Path) -> AsyncIterator[tuple[QueueStore, int]]:
    store = await QueueStore.open(tmp_path / "queue")
    cfg = Config(
        host=HostConfig("mx.deliverd.test"),
        dsn=DsnConfig("postmaster@mx.deliverd.test"),
        listen=(Listener(LISTEN, 0, ()),),
        limits=LimitsConfig(max_message_size=12 * 1024 * 1024),
    )
    servers = await start_listeners(cfg, Intake(store, lambda: cfg, lambda _qid, _source: None))
    try:
        yield store, servers[0].sockets[0].getsockname()[1]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        await store.close()


async def _client(port: int) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname=LISTEN, port=port, start_tls=False,
                           local_hostname="client.test", timeout=60)
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def _stored(store: QueueStore, qid: str) -> bytes:
    return b"".join([c async for c in store.body_chunks(qid)])


def _queue_id(reply: str) -> str:
    return reply.rsplit(" ", 1)[-1]


@pytest.mark.slow
@pytest.mark.integration
async def test_a_multi_megabyte_message_arrives_byte_identical_after_the_trace_header(
    listening: tuple[QueueStore, int],
) -> None:
    store, port = listening
    data = big_message(6 * 1024 * 1024)
    smtp = await _client(port)
    _, reply = await smtp.sendmail("app@example.test", ["user@example.test"], data)
    await smtp.quit()
    qid = _queue_id(reply)
    stored = await _stored(store, qid)
    trace, rest = stored.split(b"\r\nFrom: app@example.test\r\n", 1)
    assert trace.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert trace.count(b"\r\n") == 2  # the trace header's three lines, then the message
    assert f"id {qid}".encode() in trace
    assert b"From: app@example.test\r\n" + rest == data
    message = await store.get(qid)
    assert message is not None and message.size == len(stored) and not message.eightbit


@pytest.mark.integration
async def test_over_the_size_limit_552_nothing_queued_and_the_session_goes_on(
    listening: tuple[QueueStore, int],
) -> None:
    store, port = listening
    smtp = await _client(port)
    await smtp.mail("app@example.test")
    await smtp.rcpt("user@example.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.data(big_message(13 * 1024 * 1024))
    assert refused.value.code == 552 and refused.value.message.startswith("5.3.4")
    assert await store.list_messages() == []
    refused_rcpts, reply = await smtp.sendmail("app@example.test", ["user@example.test"],
                                               b"Subject: small\r\n\r\nok\r\n")
    await smtp.quit()
    assert refused_rcpts == {} and reply.startswith("2.0.0 Ok: queued as ")
    assert len(await store.list_messages()) == 1


@pytest.mark.integration
async def test_8bit_hops_and_line_endings_are_judged_on_the_stream(
    listening: tuple[QueueStore, int],
) -> None:
    store, port = listening
    smtp = await _client(port)
    _, reply = await smtp.sendmail("app@example.test", ["user@example.test"],
                                   big_message(3 * 1024 * 1024, eightbit=True))
    eight = await store.get(_queue_id(reply))
    assert eight is not None and eight.eightbit and not eight.held
    loop = b"".join(b"Received: from hop%d\r\n" % n for n in range(31)) + (
        b"Subject: loop\r\n\r\n" + b"Received: in the body, not counted\r\n" * 10)
    _, reply = await smtp.sendmail("app@example.test", ["user@example.test"], loop)
    held = await store.get(_queue_id(reply))  # our own trace header not counted
    assert held is not None and held.held and held.hold_reason == "mail loop: 31 hops"
    # A bare LF inside a line (sent raw: aiosmtplib would convert it) becomes CRLF.
    await smtp.mail("app@example.test")
    await smtp.rcpt("user@example.test")
    await smtp.execute_command(b"DATA")
    smtp.transport.write(b"Subject: lf\r\n\r\none\ntwo\r\n..three\r\n.\r\n")  # type: ignore[union-attr]
    reply_ = await smtp.protocol.read_response(timeout=10)  # type: ignore[union-attr]
    await smtp.quit()
    assert reply_.code == 250
    stored = await _stored(store, _queue_id(reply_.message))
    assert stored.endswith(b"\r\nSubject: lf\r\n\r\none\r\ntwo\r\n.three\r\n")


async def test_a_lost_connection_mid_data_queues_nothing(
    listening: tuple[QueueStore, int],
) -> None:
    store, port = listening
    reader, writer = await asyncio.open_connection(LISTEN, port)
    await reader.readline()
    for command in (b"EHLO c.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>",
                    b"DATA"):
        writer.write(command + b"\r\n")
        while (line := await reader.readline())[3:4] == b"-":
            pass
    stuffed = re.sub(rb"(?m)^\.", b"..", big_message(3 * 1024 * 1024))
    writer.write(stuffed[:-200])  # no final dot: the client dies
    await writer.drain()
    writer.transport.abort()
    await asyncio.sleep(0.3)
    assert await store.list_messages() == []
    assert line.startswith(b"354")


def test_a_large_body_given_as_bytes_is_stored_in_chunks_too(tmp_path: Path) -> None:
    data = big_message(2 * BODY_CHUNK + 5)
    with QueueDB.open(tmp_path) as db:
        qid = db.enqueue(NewMessage("a@example.test", ["b@example.test"], data))
        sizes = [len(c) for c in db.iter_body(qid)]
        assert sizes == [BODY_CHUNK, BODY_CHUNK, len(data) - 2 * BODY_CHUNK]
        assert db.read_data(qid) == data
        found = db.read_dispatch([qid])[qid]
        assert not isinstance(found, bytes) and data.startswith(found.head)
