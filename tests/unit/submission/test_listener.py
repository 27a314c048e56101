"""The SMTP listener: a real aiosmtplib client against a real listener on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from deliverd.config.model import Config, DsnConfig, HostConfig, LimitsConfig, Listener
from deliverd.queue.space import WAL_HEADROOM, min_free_bytes
from deliverd.queue.store import BodySpool, QueueFullError, QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.incoming import count_received
from deliverd.submission.listener import REPLY_RELAY_DENIED, start_listeners
from deliverd.submission.policy import (
    has_8bit,
    loop_hold_reason,
    parse_networks,
    received_header,
    relay_allowed,
)

pytestmark = pytest.mark.integration

MESSAGE = b"From: app@example.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"

# -- pure policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "networks", "trust_loopback", "allowed"),
    [
        ("127.0.0.1", [], True, True),
        ("127.5.6.7", [], True, True),
        ("::1", [], True, True),
        ("::ffff:127.0.0.1", [], True, True),
        ("127.0.0.1", [], False, False),
        ("127.0.0.1", ["127.0.0.0/8"], False, True),
        ("192.0.2.10", [], True, False),
        ("192.0.2.10", ["192.0.2.0/24"], True, True),
        ("::ffff:192.0.2.10", ["192.0.2.0/24"], True, True),
        ("198.51.100.1", ["192.0.2.0/24"], True, False),
        ("2001:db8::5", ["2001:db8::/32"], True, True),
        ("2001:db8::5", ["192.0.2.0/24"], True, False),
        ("fe80::1%eth0", ["fe80::/10"], True, True),
        ("not-an-ip", ["0.0.0.0/0"], True, False),
    ],
)
def test_relay_allowed_for_loopback_and_listed_networks_only(
    peer: str, networks: list[str], trust_loopback: bool, allowed: bool
) -> None:
    assert relay_allowed(peer, parse_networks(networks), trust_loopback=trust_loopback) is allowed


@pytest.mark.parametrize(
    ("data", "hops"),
    [
        (b"Subject: x\r\n\r\nReceived: in the body\r\n", 0),
        (b"Received: a\r\nreceived : b\r\n\tcontinued\r\nRECEIVED:c\r\n\r\nbody\r\n", 3),
        (b"X-Received: no\r\nSubject: Received: no\r\n\r\n", 0),
        (b"Received: only headers, no body", 1),
        (b"\r\nReceived: body only\r\n", 0),
    ],
)
def test_count_received_counts_header_fields_only(data: bytes, hops: int) -> None:
    assert count_received(data) == hops


def test_loop_hold_reason_above_max_hops_only() -> None:
    assert loop_hold_reason(30, 30) is None
    assert loop_hold_reason(31, 30) == "mail loop: 31 hops"


def test_has_8bit() -> None:
    assert not has_8bit(b"plain ascii\r\n")
    assert has_8bit("caf\u00e9".encode())


def test_received_header_names_single_recipient_and_neutralises_helo() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    one = received_header(helo="evil\r\nBcc: x", peer_ip="127.0.0.1", by_host="mx.test",
                          queue_id="ID1", recipients=["a@b.test"], protocol="ESMTP", when=when)
    assert one == (b"Received: from evil??Bcc: x ([127.0.0.1])\r\n"
                   b"\tby mx.test with ESMTP id ID1\r\n"
                   b"\tfor <a@b.test>; Wed, 01 May 2024 12:00:00 +0000\r\n")
    many = received_header(helo=None, peer_ip="::1", by_host="mx.test", queue_id="ID2",
                           recipients=["a@b.test", "c@d.test"], protocol="SMTP", when=when)
    assert b"for <" not in many and many.startswith(b"Received: from [::1]\r\n")


# -- a real listener -----------------------------------------------------------------------------


@dataclass
class Running:
    host: str
    port: int
    store: Any
    enqueued: list[str] = field(default_factory=list)

    async def client(self, **kwargs: Any) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False,
                               local_hostname="client.test", timeout=10, **kwargs)
        await smtp.connect()
        await smtp.ehlo()
        return smtp


StartFn = Callable[..., Awaitable[Running]]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await QueueStore.open(tmp_path / "queue")
    yield s
    await s.close()


@pytest.fixture
async def start(store: QueueStore) -> AsyncIterator[StartFn]:
    servers: list[asyncio.base_events.Server] = []

    async def run(*, address: str = "127.0.0.1", allow: tuple[str, ...] = (),
                  trust_loopback: bool = True, limits: LimitsConfig | None = None,
                  with_store: Any = None) -> Running:
        cfg = Config(
            host=HostConfig("mx.deliverd.test"),
            dsn=DsnConfig("postmaster@mx.deliverd.test"),
            listen=(Listener(address, 0, allow),),  # port 0: the kernel picks a free one
            limits=limits or LimitsConfig(),
        )
        target = with_store if with_store is not None else store
        running = Running(address, 0, target)
        intake = Intake(target, lambda: cfg, lambda qid, _source: running.enqueued.append(qid))
        started = await start_listeners(cfg, intake, trust_loopback=trust_loopback)
        servers.extend(started)
        running.port = started[0].sockets[0].getsockname()[1]
        return running

    yield run
    for server in servers:
        server.close()
        await server.wait_closed()


async def _send(smtp: aiosmtplib.SMTP, sender: str, rcpts: list[str], data: bytes,
                options: list[str] | None = None) -> str:
    await smtp.mail(sender, options=options or [])
    for rcpt in rcpts:
        await smtp.rcpt(rcpt)
    reply = await smtp.data(data)
    assert reply.code == 250
    return reply.message


async def test_accepted_message_is_queued_with_received_header(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start()
    smtp = await lst.client()
    reply = await _send(smtp, "app@example.test", ["user@example.test"], MESSAGE)
    await smtp.quit()
    assert reply.startswith("2.0.0 Ok: queued as ")
    qid = reply.rsplit(" ", 1)[-1]
    assert lst.enqueued == [qid]
    msg = await store.get(qid)
    assert msg is not None
    assert msg.sender == "app@example.test"
    assert [r.address for r in msg.recipients] == ["user@example.test"]
    assert not msg.held and not msg.smtputf8 and not msg.eightbit
    data = await store.read_data(qid)
    trace, rest = data.split(b"\r\n\tfor <user@example.test>; ", 1)
    assert trace == (b"Received: from client.test ([127.0.0.1])\r\n"
                     + f"\tby mx.deliverd.test with ESMTP id {qid}".encode())
    assert rest.split(b"\r\n", 1)[1] == MESSAGE
    assert msg.size == len(data)


async def test_ehlo_advertises_size_8bitmime_and_smtputf8(start: StartFn) -> None:
    lst = await start(limits=LimitsConfig(max_message_size=12345))
    smtp = await lst.client()
    assert smtp.esmtp_extensions["size"] == "12345"
    assert "8bitmime" in smtp.esmtp_extensions
    assert "smtputf8" in smtp.esmtp_extensions
    await smtp.quit()


async def test_null_sender_and_several_recipients_are_queued(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start()
    smtp = await lst.client()
    await _send(smtp, "", ["a@example.test", "b@example.test"], MESSAGE)
    await smtp.quit()
    (msg,) = await store.list_messages()
    assert msg.sender == ""
    assert [r.address for r in msg.recipients] == ["a@example.test", "b@example.test"]


async def test_size_above_limit_is_refused_at_mail(start: StartFn, store: QueueStore) -> None:
    lst = await start(limits=LimitsConfig(max_message_size=1000))
    smtp = await lst.client()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("app@example.test", options=["SIZE=5000"])
    assert refused.value.code == 552
    assert refused.value.message == "5.3.4 Message too big"
    await smtp.quit()
    assert await store.list_messages() == []


async def test_data_above_limit_is_refused_after_data(start: StartFn, store: QueueStore) -> None:
    lst = await start(limits=LimitsConfig(max_message_size=1000))
    smtp = await lst.client()
    await smtp.mail("app@example.test")
    await smtp.rcpt("user@example.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.data(MESSAGE + (b"x" * 70 + b"\r\n") * 30)
    assert (refused.value.code, refused.value.message) == (552, "5.3.4 Message too big")
    # The session stays usable and nothing of the refused message was queued.
    assert (await smtp.noop()).code == 250
    await smtp.quit()
    assert await store.list_messages() == []


async def test_client_outside_allowed_networks_gets_relay_denied(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start(address="127.0.0.2", allow=("192.0.2.0/24",), trust_loopback=False)
    smtp = await lst.client()
    await smtp.mail("app@example.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await smtp.rcpt("user@example.test")
    assert f"{refused.value.code} {refused.value.message}" == REPLY_RELAY_DENIED
    await smtp.quit()
    assert await store.list_messages() == []


async def test_client_inside_allowed_networks_may_relay(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start(address="127.0.0.2", allow=("127.0.0.0/8",), trust_loopback=False)
    smtp = await lst.client()
    await _send(smtp, "app@example.test", ["user@example.test"], MESSAGE)
    await smtp.quit()
    assert len(await store.list_messages()) == 1


class _FullStore:
    """A store whose disk is full: the boundary under test is the SMTP reply."""

    def free_bytes(self) -> int:
        return 1 << 40  # the space check passes; the write itself fails

    def spool(self) -> BodySpool:
        return BodySpool()

    async def enqueue(self, *args: object, **kwargs: object) -> str:
        raise QueueFullError("queue storage failure: SQLITE_FULL")


async def test_queue_failure_answers_452_and_acknowledges_nothing(start: StartFn) -> None:
    lst = await start(with_store=_FullStore())
    smtp = await lst.client()
    await smtp.mail("app@example.test")
    await smtp.rcpt("user@example.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.data(MESSAGE)
    assert (refused.value.code, refused.value.message) == (452, "4.3.1 Insufficient system storage")
    assert lst.enqueued == []
    await smtp.quit()


async def test_too_many_received_headers_is_accepted_but_held_as_loop(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start(limits=LimitsConfig(max_hops=3))
    smtp = await lst.client()
    looping = b"Received: from a by b; date\r\n" * 4 + MESSAGE
    reply = await _send(smtp, "app@example.test", ["user@example.test"], looping)
    at_limit = b"Received: from a by b; date\r\n" * 3 + MESSAGE
    reply_ok = await _send(smtp, "app@example.test", ["user@example.test"], at_limit)
    await smtp.quit()
    held = await store.get(reply.rsplit(" ", 1)[-1])
    assert held is not None and held.held and held.hold_reason == "mail loop: 4 hops"
    fine = await store.get(reply_ok.rsplit(" ", 1)[-1])
    assert fine is not None and not fine.held
    assert [m.queue_id for m in await store.due(10**10)] == [fine.queue_id]


async def test_smtputf8_envelope_is_flagged(start: StartFn, store: QueueStore) -> None:
    lst = await start()
    smtp = await lst.client()
    await smtp.mail("j\u00f6rg@example.test", options=["SMTPUTF8"], encoding="utf-8")
    await smtp.rcpt("\u00fcser@b\u00fccher.example", encoding="utf-8")
    body = "Subject: gr\u00fc\u00dfe\r\n\r\nHall\u00f6\r\n".encode()
    reply = await smtp.data(body)
    await smtp.quit()
    msg = await store.get(reply.message.rsplit(" ", 1)[-1])
    assert msg is not None and msg.smtputf8 and msg.eightbit
    assert msg.sender == "j\u00f6rg@example.test"
    assert msg.recipients[0].address == "\u00fcser@b\u00fccher.example"
    data = await store.read_data(msg.queue_id)
    assert b"with UTF8SMTP id" in data and data.endswith(body)


async def test_8bit_body_without_body_parameter_is_still_flagged(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start()
    smtp = await lst.client()
    reply = await _send(smtp, "app@example.test", ["user@example.test"],
                        b"Subject: x\r\n\r\ncaf\xc3\xa9 \xff\r\n")
    await smtp.quit()
    msg = await store.get(reply.rsplit(" ", 1)[-1])
    assert msg is not None and msg.eightbit and not msg.smtputf8


async def test_body_8bitmime_parameter_flags_eightbit(start: StartFn, store: QueueStore) -> None:
    lst = await start()
    smtp = await lst.client()
    reply = await _send(smtp, "app@example.test", ["user@example.test"], MESSAGE,
                        options=["BODY=8BITMIME"])
    await smtp.quit()
    msg = await store.get(reply.rsplit(" ", 1)[-1])
    assert msg is not None and msg.eightbit


async def _raw(host: str, port: int, payload: bytes, *, close_early: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()  # greeting
        writer.write(payload)
        await writer.drain()
        if close_early:
            return b""
        return await asyncio.wait_for(reader.read(65536), 5)
    except (TimeoutError, ConnectionError):
        return b""
    finally:
        writer.close()
        # The peer may already have reset the connection: that is the point of some payloads.
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_hostile_clients_do_not_break_the_listener(
    start: StartFn, store: QueueStore
) -> None:
    lst = await start()
    garbage = [
        b"\x00\xff\xfe garbage \x80\x81\r\n" * 20,
        b"A" * 200_000 + b"\r\n",
        b"EHLO x\r\nMAIL FROM:<unterminated\r\nRCPT TO:<>\r\nDATA\r\n",
        b"EHLO x\r\nMAIL FROM:<a@b.test> SIZE=abc BODY=9BIT\r\n",
        b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + b"B" * 5000,
        b"EHLO x\r\n" + b"NOOP\r\n" * 500,
        b"\r\n\r\n\r\n.\r\nQUIT\r\n",
    ]
    for payload in garbage:
        await _raw(lst.host, lst.port, payload)
    # An early disconnect in the middle of DATA queues nothing.
    await _raw(lst.host, lst.port,
               b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nSubject: t\r\n",
               close_early=True)
    await asyncio.sleep(0.2)
    assert await store.list_messages() == []
    smtp = await lst.client()
    await _send(smtp, "app@example.test", ["user@example.test"], MESSAGE)
    await smtp.quit()
    assert len(await store.list_messages()) == 1


async def test_listener_binds_every_configured_address(store: QueueStore) -> None:
    cfg = Config(
        host=HostConfig("mx.deliverd.test"),
        dsn=DsnConfig("postmaster@mx.deliverd.test"),
        listen=(Listener("127.0.0.1", 0, ()), Listener("127.0.0.3", 0, ("127.0.0.0/8",))),
    )
    servers = await start_listeners(cfg, Intake(store, lambda: cfg, lambda _qid, _source: None))
    try:
        bound = sorted(str(ipaddress.ip_address(s.sockets[0].getsockname()[0]))
                       for s in servers)
        assert bound == ["127.0.0.1", "127.0.0.3"]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


class _ShortStore:
    """A store on a filesystem with almost no free space left."""

    def free_bytes(self) -> int:
        return 4096

    def spool(self) -> BodySpool:
        return BodySpool()

    async def enqueue(self, *args: object, **kwargs: object) -> str:
        raise AssertionError("nothing may be written when space is short")


async def test_short_of_space_refuses_at_mail_with_452(start: StartFn) -> None:
    lst = await start(with_store=_ShortStore())
    smtp = await lst.client()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("app@example.test")
    assert (refused.value.code, refused.value.message) == (452, "4.3.1 Insufficient system storage")
    assert lst.enqueued == []


def test_min_free_keeps_room_for_one_and_a_half_messages_and_the_wal() -> None:
    assert min_free_bytes(50 * 1024 * 1024) == 75 * 1024 * 1024 + WAL_HEADROOM
