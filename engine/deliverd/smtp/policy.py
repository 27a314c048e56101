"""Pure SMTP client decisions: loop banners, AUTH mechanism, MAIL parameters, the DATA body.

Nothing here touches a socket, so each rule is a table row in
``tests/unit/smtp/test_smtp_errors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from deliverd.core.dsn_params import EnvelopeDsn, RcptDsn, orcpt_wire, xtext_encode
from deliverd.core.outcomes import Envelope

# Strongest first; CRAM-MD5 never puts the password on the wire, even in clear text.
MECHANISM_PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


def is_loop_banner(text: str, own_name: str) -> bool:
    """The peer calls itself by our name (first word of its greeting or EHLO reply)."""
    first_line = text.split("\n", 1)[0].split()
    return bool(first_line) and first_line[0].rstrip(".").lower() == own_name.rstrip(".").lower()


def choose_mechanism(offered: Iterable[str]) -> str | None:
    """The AUTH mechanism to use among those the server offers, or None."""
    available = {m.upper() for m in offered}
    return next((m for m in MECHANISM_PREFERENCE if m in available), None)


def may_authenticate(tls_active: bool, allow_plaintext_auth: bool) -> bool:
    """Credentials go over TLS only, unless the operator explicitly allowed plain text."""
    return tls_active or allow_plaintext_auth


def needs_smtputf8(envelope: Envelope) -> bool:
    """The envelope needs SMTPUTF8: flagged so, or an address that is not ASCII."""
    addresses = (envelope.sender, *envelope.recipients)
    return envelope.smtputf8 or not all(a.isascii() for a in addresses)


def is_eightbit(envelope: Envelope) -> bool:
    # A streamed body was judged chunk by chunk when it was queued (``eightbit``).
    data = envelope.data
    return envelope.eightbit or (isinstance(data, bytes) and not data.isascii())


def unsafe_address(address: str) -> bool:
    """Whitespace, control characters or angle brackets would corrupt the command line."""
    return bool(_UNSAFE_ADDRESS.search(address))


def size_limit(features: Mapping[str, str]) -> int | None:
    """The server's SIZE limit in octets; None when not announced or unlimited (SIZE 0)."""
    if "size" not in features:
        return None
    value = features["size"].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def mail_parameters(
    features: Mapping[str, str], size: int, eightbit: bool, smtputf8: bool
) -> tuple[str, ...]:
    """ESMTP parameters for MAIL FROM. 8-bit without 8BITMIME is sent anyway, as Postfix does."""
    params: list[str] = []
    if "size" in features:
        params.append(f"SIZE={size}")
    if eightbit and "8bitmime" in features:
        params.append("BODY=8BITMIME")
    if smtputf8 and "smtputf8" in features:
        params.append("SMTPUTF8")
    return tuple(params)


def dsn_mail_parameters(features: Mapping[str, str], dsn: EnvelopeDsn) -> tuple[str, ...]:
    """RET and ENVID for MAIL FROM, to a hop that offers DSN (RFC 3461 §4.3, §4.4)."""
    if "dsn" not in features:
        return ()
    params: list[str] = []
    if dsn.ret is not None:
        params.append(f"RET={dsn.ret.value}")
    if dsn.envid is not None:
        params.append(f"ENVID={xtext_encode(dsn.envid)}")
    return tuple(params)


def dsn_rcpt_parameters(features: Mapping[str, str], dsn: RcptDsn) -> tuple[bytes, ...]:
    """NOTIFY and ORCPT for RCPT TO, to a hop that offers DSN (RFC 3461 §4.1, §4.2). With no
    ORCPT recorded none is sent: the hop then takes the RCPT address as the original one."""
    if "dsn" not in features:
        return ()
    params: list[bytes] = []
    if dsn.notify is not None:
        params.append(b"NOTIFY=" + dsn.notify.encode("ascii"))
    if dsn.orcpt is not None:
        params.append(b"ORCPT=" + orcpt_wire(dsn.orcpt).encode("ascii"))
    return tuple(params)


def wire_body(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dot-stuffed, with the final dot."""
    body = _LINE_ENDINGS.sub(b"\r\n", data)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return _LEADING_DOT.sub(b"..", body) + b".\r\n"


class WireStuffer:
    """``wire_body`` on a stream: CRLF line ends and dot-stuffing across chunk boundaries.

    ``feed`` each chunk in order, send what it returns, then send ``finish()`` (the final
    CRLF when missing and the dot). ``size`` is then the RFC 1870 SIZE of what was fed.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False  # a chunk ended in CR: is it half of a CRLF?
        self._empty = True
        self.size = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        self._empty = False
        body = _LINE_ENDINGS.sub(b"\r\n", chunk)
        self.size += len(body)
        # A leading "x" keeps a chunk that starts mid-line from being stuffed at its start.
        stuffed = _LEADING_DOT.sub(b"..", (b"\n" if self._at_line_start else b"x") + body)
        self._at_line_start = body.endswith(b"\n")
        return stuffed[1:]

    def finish(self) -> bytes:
        tail = b""
        if self._pending_cr:
            self._pending_cr, self._empty, self._at_line_start = False, False, True
            tail = b"\r\n"
        if self._empty or not self._at_line_start:
            tail += b"\r\n"
        self.size += len(tail)
        return tail + b".\r\n"


def wire_size(data: bytes) -> int:
    """RFC 1870 SIZE: octets as transmitted, CRLFs included, before dot-stuffing."""
    body = _LINE_ENDINGS.sub(b"\r\n", data)
    return len(body) + (0 if body.endswith(b"\r\n") else 2)
