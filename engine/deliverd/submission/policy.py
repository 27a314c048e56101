"""The listener's pure decisions: who may relay, when a message is held as a loop, the trace
field it gets, and how the envelope sender is written. No sockets: each is a table row in
``tests/unit/submission/test_listener.py``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def relay_allowed(
    peer_ip: str, allow_networks: Sequence[IPNetwork], *, trust_loopback: bool = True
) -> bool:
    """May this client relay? Loopback always may (unless told otherwise), others by network."""
    try:
        ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if trust_loopback and ip.is_loopback:
        return True
    return any(ip.version == net.version and ip in net for net in allow_networks)


def loop_hold_reason(hops: int, max_hops: int) -> str | None:
    """Why the message is held for too many hops, or None when it may go on."""
    return f"mail loop: {hops} hops" if hops > max_hops else None


def has_8bit(data: bytes) -> bool:
    # bytes.isascii runs in C: a 50 MB message is checked without stalling the event loop.
    return not data.isascii()


def _header_safe(text: str) -> str:
    # Client-chosen text (HELO name) must not be able to inject header lines.
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:255]


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    by_host: str,
    queue_id: str,
    recipients: Sequence[str],
    protocol: str,
    when: datetime,
) -> bytes:
    """A Postfix-style trace field, CRLF-terminated (RFC 5321 4.4)."""
    from_part = f"from {_header_safe(helo)} ([{peer_ip}])" if helo else f"from [{peer_ip}]"
    lines = [f"Received: {from_part}", f"\tby {by_host} with {protocol} id {queue_id}"]
    # One recipient is named (as Postfix does); naming several would disclose Bcc recipients.
    if len(recipients) == 1:
        lines.append(f"\tfor <{_header_safe(recipients[0])}>; {format_datetime(when)}")
    else:
        lines[-1] += f"; {format_datetime(when)}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def protocol_name(esmtp: bool, smtputf8: bool) -> str:
    """The ``with`` keyword of RFC 3848 / RFC 6531."""
    if smtputf8:
        return "UTF8SMTP"
    return "ESMTP" if esmtp else "SMTP"


def envelope_sender(mail_from: str) -> str:
    """aiosmtpd keeps ``<>`` for the null reverse-path; the queue stores it as ''."""
    return "" if mail_from == "<>" else mail_from
