"""One message as its DATA arrives, judged on the stream (see the listener).

The header section is kept (bounded) until it ends, then rewritten by the local users' rules
and its ``Received:`` fields counted; everything after it goes to the queue's ``BodySpool`` in
bounded writes; 8-bit content is noticed on the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deliverd.queue.spool import BodySpool
from deliverd.submission.local import LocalPolicy

_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def header_block(data: bytes) -> bytes:
    """The header section of a message (everything before the first empty line)."""
    if data.startswith((b"\r\n", b"\n")):
        return b""
    end = _HEADER_END.search(data)
    return data if end is None else data[: end.start()]


def count_received(data: bytes) -> int:
    """How many Received: header fields the message carries (continuation lines excluded)."""
    return sum(
        1 for line in header_block(data).splitlines() if _RECEIVED.match(line) is not None
    )


# Bytes gathered before one write to the spool, and the most header kept in memory to be
# rewritten and counted; a header section longer than that goes on as body.
_SPOOL_WRITE = 64 * 1024
_MAX_HEADER = 256 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True)
class Written:
    """What the way in learnt of a message's content as it was written: its queue id (named by
    the trace header), the trace header's size (the spool's first bytes, never signed), the
    ``Received:`` fields it came with, and whether it has 8-bit content."""

    queue_id: str
    trace_size: int
    hops: int
    eightbit: bool


class IncomingMessage:
    """One message as DATA arrives: the header section is kept until it ends (then masqueraded,
    its Received: fields counted), everything after it goes to the spool in bounded writes, and
    8-bit content is noticed on the way. The trace header is the spool's first line."""

    def __init__(self, spool: BodySpool, trace: bytes, policy: LocalPolicy, queue_id: str) -> None:
        self.spool = spool
        self.trace_size = len(trace)  # the spool's first bytes: the Received: field
        self.policy = policy
        self.queue_id = queue_id
        self.header: list[bytes] | None = []
        self.header_size = 0
        self.hops = 0
        self.eightbit = False
        self._buf = bytearray()
        spool.write(trace)

    def feed(self, line: bytes) -> None:
        """One unstuffed line, CRLF-terminated (bare LFs inside it become CRLF)."""
        if b"\n" in line[:-2]:
            line = _BARE_LF.sub(b"\r\n", line)
        if self.header is not None:
            if line != b"\r\n" and self.header_size + len(line) <= _MAX_HEADER:
                self.header.append(line)
                self.header_size += len(line)
                return
            self._end_header()
        self._buf += line
        if len(self._buf) >= _SPOOL_WRITE:
            self._flush()

    def write_message(self, data: bytes) -> None:
        """A whole message a local source has as bytes (a drop file, ``deliverd send``'s input,
        a notice): judged as DATA lines would be. Lines may end in LF or CRLF."""
        start = 0
        while self.header is not None and start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            line = data[start:end]
            if line.endswith(b"\n") and not line.endswith(b"\r\n"):
                line = line[:-1] + b"\r\n"
            self.feed(line)
            start = end
        while start < len(data):  # the body in bounded writes, each cut just after a LF
            end = data.find(b"\n", start + _SPOOL_WRITE)
            end = len(data) if end < 0 else end + 1
            self._buf += _BARE_LF.sub(b"\r\n", data[start:end])
            self._flush()
            start = end

    def _end_header(self) -> None:
        assert self.header is not None
        header = b"".join(self.header)
        self.header = None
        self.hops = count_received(header)
        self._buf += self.policy.rewrite_message(header)

    def _flush(self) -> None:
        if not self.eightbit and not self._buf.isascii():
            self.eightbit = True
        self.spool.write(self._buf)
        self._buf.clear()

    def done(self) -> BodySpool:
        """The whole message (trace header first) in the spool."""
        if self.header is not None:
            self._end_header()
        self._flush()
        return self.spool

    def written(self) -> Written:
        """What was learnt of the content (once ``done``)."""
        return Written(self.queue_id, self.trace_size, self.hops, self.eightbit)

    def close(self) -> None:
        self.spool.close()
