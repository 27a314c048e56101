"""A message as a local program hands it over (``sendmail``'s stdin, or DATA of ``sendmail -bs``).

Lines end in CRLF whatever they ended in; without ``-i`` a lone "." ends the message, in DATA it
always does and ".." is unstuffed; the size limit is checked as lines arrive. The header section
is read first (``-t`` needs it, and missing fields are added), the body is streamed in chunks.

``sendmail`` reads the message through ``MessageInput`` and completes its header with
``complete_header``, on every run: this module imports nothing beyond what the interpreter loads
at start-up (no ``re``, no ``typing``, not the email package but for a non-ASCII full name).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Protocol

    class LineSource(Protocol):
        """Where a message is read from: stdin, or stdin with lines read already put back."""

        def readline(self) -> bytes: ...

CHUNK = 64 * 1024
# A field name: printable US-ASCII except ":" (RFC 5322 ftext), then ":".
_FTEXT = frozenset(range(33, 127)) - {ord(":")}

# sysexits.h
EX_DATAERR = 65
EX_IOERR = 74


class InputError(Exception):
    """The message cannot be taken; ``exit_code`` is the sysexits code to use."""

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        super().__init__(message)


class TooBig(InputError):
    """Larger than ``limits.max_message_size``."""


class MessageInput:
    """Lines of the message from a binary stream, CRLF-terminated, with the size limit."""

    def __init__(self, stream: LineSource, *, dot_ends: bool, smtp: bool, max_size: int) -> None:
        self.stream = stream
        self.dot_ends = dot_ends
        self.smtp = smtp  # DATA: "." ends, ".." is unstuffed, EOF before "." is an error
        self.max_size = max_size
        self.size = 0
        self.ended = False
        self.pending: bytes | None = None

    def line(self) -> bytes | None:
        """The next line with CRLF, or None at the end of the message."""
        if self.pending is not None:
            line, self.pending = self.pending, None
            return line
        if self.ended:
            return None
        try:
            raw = self.stream.readline()
        except OSError as exc:
            raise InputError(EX_IOERR, f"reading the message: {exc.strerror or exc}") from None
        if not raw:
            self.ended = True
            if self.smtp:
                raise InputError(EX_DATAERR, "the input ended inside DATA")
            return None
        text = raw.rstrip(b"\r\n")
        if text == b"." and (self.dot_ends or self.smtp):
            self.ended = True
            return None
        if self.smtp and text.startswith(b"."):
            text = text[1:]
        self.size += len(text) + 2
        if self.size > self.max_size:
            raise TooBig(EX_DATAERR,
                         f"message larger than limits.max_message_size ({self.max_size} bytes)")
        return text + b"\r\n"

    def header(self) -> bytes:
        """The header section; the first line that is not a header field starts the body."""
        lines: list[bytes] = []
        first = True
        while (line := self.line()) is not None:
            if first and line.startswith(b"From "):  # an mbox separator, not a field
                first = False
                continue
            first = False
            if line == b"\r\n":
                break
            continued = line[:1] in (b" ", b"\t") and bool(lines)
            if continued or is_field_start(line):
                lines.append(line)
            else:
                self.pending = line
                break
        return b"".join(lines)

    def body(self) -> Iterator[bytes]:
        buffer: list[bytes] = []
        size = 0
        while (line := self.line()) is not None:
            buffer.append(line)
            size += len(line)
            if size >= CHUNK:
                yield b"".join(buffer)
                buffer, size = [], 0
        if buffer:
            yield b"".join(buffer)


def is_field_start(line: bytes) -> bool:
    """Whether a line begins a header field (a field name, then ":")."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and all(byte in _FTEXT for byte in name)


def split_fields(header: bytes) -> list[bytes]:
    """Header fields with their continuation lines and line endings, in order."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_names(header: bytes) -> set[str]:
    """The lower-cased names of a header section's fields."""
    return {f.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            for f in split_fields(header)}


def complete_header(header: bytes, *, sender: str, fullname: str | None, domain: str,
                    drop_bcc: bool) -> bytes:
    """Bcc: removed (``-t``), and From:, Date: and Message-ID: added when missing, as the
    ``email.utils`` functions would write them (``format_address``, ``format_date``,
    ``make_msgid``)."""
    fields = split_fields(header)
    if drop_bcc:
        fields = [f for f in fields if f.split(b":", 1)[0].strip().lower() != b"bcc"]
    names = field_names(b"".join(fields))
    added = []
    if "from" not in names:
        added.append(f"From: {format_address(fullname or '', sender or 'MAILER-DAEMON')}")
    if "date" not in names:
        added.append(f"Date: {format_date(time.time())}")
    if "message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain)}")
    return b"".join(fields) + "".join(f"{line}\r\n" for line in added).encode("utf-8")


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SPECIALS = frozenset('[]\\()<>@,:;".')


def format_date(when: float) -> str:
    """``email.utils.formatdate(when, localtime=True)``."""
    tm = time.localtime(when)
    offset = tm.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, rest = divmod(abs(offset), 3600)
    minutes, seconds = divmod(rest, 60)
    zone = f"{sign}{hours:02d}{minutes:02d}" + (f"{seconds:02d}" if seconds else "")
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year:04d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {zone}")


def format_address(name: str, address: str) -> str:
    """``email.utils.formataddr((name, address))``, and a non-ASCII address (SMTPUTF8) as it
    is, where ``formataddr`` refuses one."""
    if not name:
        return address
    if not name.isascii():  # RFC 2047, as formataddr encodes it: the email package's work
        from email.charset import Charset

        return f"{Charset('utf-8').header_encode(name)} <{address}>"
    quote = '"' if any(c in _SPECIALS for c in name) else ""
    name = name.replace("\\", "\\\\").replace('"', '\\"')
    return f"{quote}{name}{quote} <{address}>"


def make_msgid(domain: str) -> str:
    """``email.utils.make_msgid(domain=domain)``: hundredths of a second, pid, 64 random bits."""
    import posix

    return (f"<{int(time.time() * 100)}.{posix.getpid()}."
            f"{int.from_bytes(posix.urandom(8), 'big')}@{domain}>")


def submitting_user() -> tuple[str, str]:
    """(login name, full name) of the real uid: who hands the message over."""
    import posix
    import pwd

    try:
        entry = pwd.getpwuid(posix.getuid())
    except KeyError:
        return "unknown", ""
    return entry.pw_name, entry.pw_gecos.split(",", 1)[0]
