"""Sending a body in bounded chunks: the on-the-fly dot-stuffing, and the transport streaming a
multi-MB body to a real (scripted aiosmtpd) server, in clear and over TLS."""

from __future__ import annotations

import random
import smtplib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deliverd.config.convert import config_from_spec
from deliverd.config.model import Config
from deliverd.core.outcomes import Envelope, Hop, Route, StreamedBody
from deliverd.smtp.policy import WireStuffer, wire_body, wire_size
from deliverd.smtp.transport import Transport
from deliverd.spec.normalise import normalise
from tests.fixtures.engine import Engine
from tests.fixtures.smtp_sink import SinkFactory
from tests.unit.submission.test_streamed_bodies import big_message

CHUNK = 1024 * 1024


def _splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("data", [
    b"",
    b".",
    b"\r",
    b"no newline at the end",
    b".lead\r\n..two\r\n.\r\nmid.dot\r\n",
    b"bare\nlf\rcr\r\n\r\n.x\n.y\r.z\r",
    b"\r\n.\r\n\r\n",
    b"a" * 50 + b"\r\n." + b"b" * 50,
])
def test_streamed_stuffing_equals_wire_body_however_the_body_is_cut(data: bytes) -> None:
    rng = random.Random(len(data))
    for _ in range(200 if len(data) > 1 else 1):
        stuffer = WireStuffer()
        pieces = _splits(data, rng) if len(data) > 1 else [data]
        out = b"".join(stuffer.feed(p) for p in pieces) + stuffer.finish()
        assert out == wire_body(data), pieces
        assert stuffer.size == wire_size(data)


def _cfg(**routing: Any) -> Config:
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": "deliverd.test"},
        "timeouts": {"connect": "5s", "greeting": "5s", "command": "10s",
                     "data_response": "30s"},
        "routing": routing,
    }
    return config_from_spec(normalise(spec))


def _streamed(data: bytes, reads: list[int] | None = None,
              fail_after: int | None = None) -> StreamedBody:
    def chunks() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            for n, start in enumerate(range(0, len(data), CHUNK)):
                if fail_after is not None and n >= fail_after:
                    raise KeyError("the message was removed while it was read")
                if reads is not None:
                    reads.append(n)
                yield data[start:start + CHUNK]
        return gen()

    return StreamedBody(len(data), data[:CHUNK], chunks)


Send = Callable[..., Any]


async def _send(cfg: Config, hop: Hop, body: StreamedBody) -> Any:
    transport = Transport(cfg)
    try:
        return await transport.transact(hop, Envelope("a@src.test", ("b@dst.test",), body))
    finally:
        await transport.close()


@pytest.mark.slow
@pytest.mark.integration
async def test_a_streamed_body_reaches_an_mx_byte_identical(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=True)
    data = big_message(5 * CHUNK + 777)
    reads: list[int] = []
    result = await _send(_cfg(), Hop("mx1.test", sink.host, sink.port, Route.DIRECT, 10),
                         _streamed(data, reads))
    assert result.failure is None, result.failure
    assert sink.wait_for(1, timeout=30)
    message = sink.messages[0]
    assert message.tls and message.data == data
    assert f"SIZE={wire_size(data)}" in message.mail_options
    assert reads == list(range(6)) * 2  # once for SIZE, once to send


@pytest.mark.slow
@pytest.mark.integration
async def test_a_streamed_body_reaches_the_smarthost_over_tls_byte_identical(
    smtp_sink: SinkFactory, ca_file: str,
) -> None:
    sink = smtp_sink(starttls=True)
    data = big_message(4 * CHUNK, seed=3, eightbit=True)
    cfg = _cfg(mode="smarthost", smarthost={"host": "smtp.test", "port": sink.port,
                                            "tls": "starttls", "ca_file": ca_file})
    result = await _send(cfg, Hop("smtp.test", sink.host, sink.port, Route.SMARTHOST),
                         _streamed(data))
    assert result.failure is None, result.failure
    assert sink.wait_for(1, timeout=30)
    assert sink.messages[0].tls and sink.messages[0].data == data


@pytest.mark.integration
async def test_a_body_that_fails_to_read_is_never_finished(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    data = big_message(3 * CHUNK)
    transport = Transport(_cfg())
    try:
        body = _streamed(data, fail_after=2)
        env = Envelope("a@src.test", ("b@dst.test",), body)
        with pytest.raises(KeyError):
            # SIZE reads the whole body first: make it fail only on the second pass
            await transport.transact(
                Hop("mx1.test", sink.host, sink.port, Route.DIRECT, 10),
                Envelope(env.sender, env.recipients, StreamedBody(
                    body.size, body.head, _second_pass_fails(data))))
    finally:
        await transport.close()
    sink.wait_for(1, timeout=2)
    assert sink.messages == []


def _second_pass_fails(data: bytes) -> Callable[[], AsyncIterator[bytes]]:
    calls = []

    def chunks() -> AsyncIterator[bytes]:
        calls.append(1)
        return _streamed(data, fail_after=None if len(calls) == 1 else 2).chunks()

    return chunks


@pytest.mark.slow
@pytest.mark.integration
def test_a_multi_megabyte_message_crosses_the_daemon_byte_identical(
    engine_factory: Callable[..., Engine], smtp_sink: SinkFactory,
) -> None:
    """Listener -> chunk rows -> scheduler -> streamed DATA -> the smart host: what arrives is
    the submitted message with the daemon's trace header in front, nothing else changed."""
    sink = smtp_sink("127.0.0.92")
    engine = engine_factory({
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.92", "port": sink.port, "tls": "none"}},
        "dsn": {"notify_delayed": False},
    })
    data = big_message(7 * CHUNK, seed=29)
    with smtplib.SMTP("127.0.0.1", engine.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("app@example.test", ["user@example.test"], data)
    engine.wait_status("user@example.test", "sent", timeout=60)
    assert sink.wait_for(1, timeout=10)
    arrived = sink.messages[0].data
    trace, rest = arrived.split(b"\r\nFrom: app@example.test\r\n", 1)
    assert trace.startswith(b"Received: from client.test ") and trace.count(b"\r\n") == 2
    assert b"From: app@example.test\r\n" + rest == data
    assert engine.queue() == []
