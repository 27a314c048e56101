"""RFC 3461 DSN parameters: xtext, and the values of RET, ENVID, NOTIFY and ORCPT. Pure.

What a client asks for is kept decoded (``ENVID`` as its text, ``ORCPT`` as
``addr-type;address``) and encoded again with ``xtext_encode`` when it goes on to a next hop.
Every malformed value raises ``DsnSyntaxError`` carrying the 501 reply the listener sends.

Lengths: RFC 3461 §4.4 and §4.2 cap ENVID at 100 characters and ORCPT at 500; they are
checked on the encoded (wire) form, which is never shorter than the decoded one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

MAX_ENVID = 100
MAX_ORCPT = 500

NOTIFY_NEVER = "NEVER"
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")  # canonical order of a stored NOTIFY


class DsnEvent(StrEnum):
    """What a notice would report, as NOTIFY names it."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Ret(StrEnum):
    FULL = "FULL"
    HDRS = "HDRS"


class DsnSyntaxError(ValueError):
    """A DSN parameter the client got wrong; ``reply`` is the SMTP answer to it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reply = f"501 5.5.4 {message}"


# xchar: "!" to "~" except "+" and "="; hexchar: "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")  # lower-case hex accepted too
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")  # an RFC 5322 atom


def xtext_encode(text: str) -> str:
    """``text`` as xtext (RFC 3461 §4): "+", "=", controls, space and non-ASCII as +XX (each
    UTF-8 octet of a non-ASCII character)."""
    out: list[str] = []
    for octet in text.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def xtext_decode(value: str) -> str:
    """The text an xtext value stands for; ``ValueError`` when it is not xtext."""
    if not _XTEXT.fullmatch(value):
        raise ValueError(f"not xtext: {value!r}")
    raw = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "+":
            raw.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(value[i]))
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def parse_ret(value: str) -> Ret:
    try:
        return Ret(value.upper())
    except ValueError:
        raise DsnSyntaxError("RET must be FULL or HDRS") from None


def parse_envid(value: str) -> str:
    """ENVID as it arrives in MAIL FROM (xtext), decoded."""
    if len(value) > MAX_ENVID:
        raise DsnSyntaxError(f"ENVID longer than {MAX_ENVID} characters")
    try:
        envid = xtext_decode(value)
    except ValueError:
        raise DsnSyntaxError("ENVID is not valid xtext") from None
    return check_envid(envid)


def check_envid(envid: str) -> str:
    """An envelope id as text (``sendmail -V``, or decoded): printable US-ASCII (RFC 3461
    §4.4), at most 100 characters once xtext-encoded, so a next hop takes it as it is."""
    if not envid or not envid.isprintable() or not envid.isascii():
        raise DsnSyntaxError("ENVID must be printable US-ASCII")
    if len(xtext_encode(envid)) > MAX_ENVID:
        raise DsnSyntaxError(f"ENVID longer than {MAX_ENVID} characters as xtext")
    return envid


def parse_notify(value: str) -> str:
    """NEVER, or SUCCESS/FAILURE/DELAY (any of them, once each) in canonical order."""
    words = [w.upper() for w in value.split(",")]
    if words == [NOTIFY_NEVER]:
        return NOTIFY_NEVER
    if not words or len(set(words)) != len(words) or not set(words) <= set(NOTIFY_WORDS):
        raise DsnSyntaxError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return ",".join(w for w in NOTIFY_WORDS if w in words)


def parse_orcpt(value: str) -> str:
    """``addr-type;address`` with the address decoded from xtext."""
    if len(value) > MAX_ORCPT:
        raise DsnSyntaxError(f"ORCPT longer than {MAX_ORCPT} characters")
    addr_type, sep, encoded = value.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(addr_type) or not encoded:
        raise DsnSyntaxError("ORCPT must be addr-type;xtext")
    try:
        address = xtext_decode(encoded)
    except ValueError:
        raise DsnSyntaxError("ORCPT address is not valid xtext") from None
    if not address.isprintable():
        raise DsnSyntaxError("ORCPT address has control characters")
    return f"{addr_type.lower()};{address}"


def orcpt_wire(orcpt: str) -> str:
    """A stored ``addr-type;address`` as the ORCPT value to send on."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"


def orcpt_of(address: str) -> str:
    """The ORCPT we record for an address an alias rewrote (Postfix's original_recipient)."""
    return f"{'rfc822' if address.isascii() else 'utf-8'};{address}"


def notify_wants(notify: str | None, event: DsnEvent) -> bool:
    """Whether a notice of ``event`` goes to the sender. Without NOTIFY: failures and delays
    (RFC 3461 §4.1, and what deliverd did before DSN support), never success."""
    if notify is None:
        return event is not DsnEvent.SUCCESS
    return event.value in notify.split(",")


@dataclass(frozen=True)
class MailDsn:
    """What MAIL FROM asked: RET and ENVID."""

    ret: Ret | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RcptDsn:
    """What one RCPT TO asked: NOTIFY and ORCPT."""

    notify: str | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class EnvelopeDsn:
    """A message's DSN request as the queue keeps it, for one delivery attempt."""

    ret: Ret | None = None
    envid: str | None = None
    recipients: Mapping[str, RcptDsn] = field(default_factory=dict)

    def of(self, recipient: str) -> RcptDsn:
        return self.recipients.get(recipient, _NO_RCPT_DSN)


_NO_RCPT_DSN = RcptDsn()


def _split(tokens: Iterable[str], known: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The ``known`` KEY=value tokens (once each) and the other tokens, as given."""
    found: dict[str, str] = {}
    rest: list[str] = []
    for token in tokens:
        key, eq, value = token.partition("=")
        name = key.upper()
        if name not in known:
            rest.append(token)
            continue
        if name in found:
            raise DsnSyntaxError(f"{name} given twice")
        if not eq or not value:
            raise DsnSyntaxError(f"{name} needs a value")
        found[name] = value
    return found, rest


def parse_mail_params(tokens: Iterable[str]) -> tuple[MailDsn, list[str]]:
    """RET and ENVID among the MAIL FROM parameters, and the parameters left."""
    found, rest = _split(tokens, ("RET", "ENVID"))
    ret = parse_ret(found["RET"]) if "RET" in found else None
    envid = parse_envid(found["ENVID"]) if "ENVID" in found else None
    return MailDsn(ret, envid), rest


def parse_rcpt_params(tokens: Iterable[str]) -> tuple[RcptDsn, list[str]]:
    """NOTIFY and ORCPT among the RCPT TO parameters, and the parameters left."""
    found, rest = _split(tokens, ("NOTIFY", "ORCPT"))
    notify = parse_notify(found["NOTIFY"]) if "NOTIFY" in found else None
    orcpt = parse_orcpt(found["ORCPT"]) if "ORCPT" in found else None
    return RcptDsn(notify, orcpt), rest
