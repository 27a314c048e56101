"""The reply side of a pipelined group, fed byte by byte as a network would deliver it.

Pure unit tests: the protocol gets a stand-in transport that only records writes. The same
code against real servers is in ``tests/lab/test_pipelining.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from aiosmtplib.errors import (
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol

from deliverd.smtp.pipelining import PipeliningProtocol, ReplyQueue, adopt, command_line


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


def connected() -> tuple[PipeliningProtocol, _Transport]:
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    return adopt(protocol), transport


async def replies(group: ReplyQueue, n: int) -> list[tuple[int, str]]:
    return [(r.code, r.message) for r in [await group.get(1.0) for _ in range(n)]]


GROUP = [(b"MAIL", b"FROM:<a@x.test>"), (b"RCPT", b"TO:<b@y.test>"), (b"DATA",)]


async def test_adopting_tells_the_transport_its_protocol_again() -> None:
    # uvloop's transports call the data_received they were made with, until told again.
    protocol, transport = connected()
    assert transport.protocol is protocol and type(protocol) is PipeliningProtocol


async def test_a_group_is_written_in_one_write() -> None:
    protocol, transport = connected()
    protocol.begin_group(b"".join(command_line(w) for w in GROUP))
    assert bytes(transport.written) == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"


async def test_replies_in_one_segment_are_all_kept_in_order() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    protocol.data_received(b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert await replies(group, 3) == [(250, "2.1.0 Ok"), (550, "5.1.1 no"), (354, "go")]
    assert protocol.end_group()


@pytest.mark.parametrize("cut", [1, 3, 4, 9, 14, 20, 27])
async def test_replies_split_anywhere_arrive_whole(cut: int) -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    wire = b"250 2.1.0 Ok\r\n452-4.2.2 first\r\n452 4.2.2 second\r\n"
    protocol.data_received(wire[:cut])
    protocol.data_received(wire[cut:])
    assert await replies(group, 2) == [(250, "2.1.0 Ok"), (452, "4.2.2 first\n4.2.2 second")]
    assert protocol.end_group()


async def test_replies_before_a_disconnect_are_still_handed_out() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    protocol.data_received(b"250 Ok\r\n421 4.3.2 bye\r\n")
    protocol.connection_lost(None)
    assert await replies(group, 2) == [(250, "Ok"), (421, "4.3.2 bye")]
    with pytest.raises(SMTPServerDisconnected):
        await group.get(1.0)


async def test_eof_mid_group_fails_the_replies_still_owed() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    protocol.eof_received()
    with pytest.raises(SMTPServerDisconnected):
        await group.get(1.0)


async def test_garbage_fails_the_group() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    protocol.data_received(b"250 Ok\r\nnot smtp\r\n")
    assert await replies(group, 1) == [(250, "Ok")]
    with pytest.raises(SMTPResponseException):
        await group.get(1.0)


async def test_a_missing_reply_times_out() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    with pytest.raises(SMTPReadTimeoutError):
        await group.get(0.01)


async def test_more_replies_than_commands_put_the_session_out_of_step() -> None:
    protocol, _ = connected()
    group = protocol.begin_group(b"")
    protocol.data_received(b"250 Ok\r\n250 extra\r\n")
    await replies(group, 1)
    assert not protocol.end_group()


async def test_outside_a_group_it_is_aiosmtplibs_protocol() -> None:
    protocol, transport = connected()
    protocol.data_received(b"220 hello\r\n")  # the greeting, awaited since connection_made
    assert (await protocol.read_response(1.0)).code == 220
    response = asyncio.ensure_future(protocol.execute_command(b"NOOP", timeout=1.0))
    await asyncio.sleep(0)
    protocol.data_received(b"250 2.0.0 Ok\r\n")
    assert (await response).code == 250
    assert transport.written.endswith(b"NOOP\r\n")


def test_a_line_break_inside_a_word_is_refused() -> None:
    with pytest.raises(ValueError):
        command_line((b"RCPT", b"TO:<a@b>\r\nDATA"))
