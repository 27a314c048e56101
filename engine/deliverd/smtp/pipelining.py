"""RFC 2920 command pipelining underneath aiosmtplib, which reads one reply per command sent.

aiosmtplib's protocol parses one reply per read and, as a guard against unsolicited data,
drops every byte that arrives while no command waits or while a parsed reply has not been
picked up yet. With a pipelined group several replies are in flight at once and may arrive in
one segment or in many, so that guard would lose them. While a group is out,
``PipeliningProtocol`` therefore parses every complete reply into a ``ReplyQueue`` instead;
outside a group it is aiosmtplib's protocol unchanged (the same guard, the same parser).
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib.errors import (
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

__all__ = ["PipeliningProtocol", "ReplyQueue", "adopt", "command_line"]


class ReplyQueue:
    """The replies of one pipelined group, in the order they arrived, or why none will come."""

    def __init__(self) -> None:
        self._replies: deque[SMTPResponse] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, response: SMTPResponse) -> None:
        self._replies.append(response)
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def pending(self) -> int:
        """Replies parsed and not yet taken."""
        return len(self._replies)

    async def get(self, seconds: float) -> SMTPResponse:
        """The next reply; replies that arrived before a disconnect are still handed out."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, seconds)
            except TimeoutError:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self._waiter = None
        return self._replies.popleft()


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol that can also read the replies of a pipelined group."""

    _group: ReplyQueue | None = None  # a class default: ``adopt`` never runs __init__

    def begin_group(self, command_lines: bytes) -> ReplyQueue:
        """Write every command of a group in one write; its replies go to the queue returned."""
        group = ReplyQueue()
        self._group = group
        self.write(command_lines)
        return group

    def end_group(self) -> bool:
        """Back to one reply per command; False when bytes beyond the group's replies came
        (the dialogue is then out of step and the session must not be used again)."""
        group, self._group = self._group, None
        return (group is None or group.pending == 0) and not self._buffer

    def data_received(self, data: bytes) -> None:
        group = self._group
        if group is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            group.fail(SMTPResponseException(-1, "Response too long"))
            return
        try:
            while (response := self._read_response_from_buffer()) is not None:
                group.put(response)
        except SMTPResponseException as exc:
            group.fail(exc)

    def eof_received(self) -> bool:
        if self._group is not None:
            self._group.fail(SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._group is not None:
            lost = SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self._group.fail(lost)
        super().connection_lost(exc)


def adopt(protocol: SMTPProtocol) -> PipeliningProtocol:
    """Give a connected aiosmtplib protocol the pipelining methods.

    aiosmtplib builds its protocol inside ``SMTP.connect`` with no factory to pass, so the
    instance's class is switched to the subclass, which adds methods and a class attribute
    only (no state of its own to initialise). The transport is then told its protocol again:
    uvloop's transports keep the protocol's bound ``data_received`` from when they were made,
    and would go on calling the old one.
    """
    if not isinstance(protocol, PipeliningProtocol):
        protocol.__class__ = PipeliningProtocol
        if protocol.transport is not None:
            protocol.transport.set_protocol(protocol)
    assert isinstance(protocol, PipeliningProtocol)
    return protocol


def command_line(words: tuple[bytes, ...]) -> bytes:
    """One command as it goes on the wire; a CR or LF in a word would smuggle in another."""
    for word in words:
        if b"\r" in word or b"\n" in word:
            raise ValueError("command contains a line break")
    return b" ".join(words) + b"\r\n"
