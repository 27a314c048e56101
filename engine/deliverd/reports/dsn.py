"""Delivery status notifications: RFC 3464 reports inside an RFC 6522 multipart/report.

``build_dsn`` is pure: outcomes in, message bytes (CRLF) out. The scheduler enqueues the result
with an empty envelope sender, so a DSN that fails is never bounced again (``needs_dsn``).

Everything a remote server said is untrusted: replies are cut to one line without control
characters before they reach a header (a hostile reply cannot inject fields), long fields are
folded by the email policy, and transcript lines that look like AUTH payloads are masked even
though the transport already redacts them.

Non-ASCII addresses (SMTPUTF8) switch the whole report to RFC 6533: UTF-8 header fields,
``message/global-delivery-status`` and ``utf-8;`` address types; such a DSN must be sent with
SMTPUTF8 (``requires_smtputf8``).
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid
from enum import StrEnum

from deliverd.core.outcomes import Kind, Outcome


class DsnKind(StrEnum):
    FAILURE = "failure"
    DELAY = "delay"
    RELAYED = "relayed"  # NOTIFY=SUCCESS, handed to a hop that does not offer DSN


SUBJECTS = {
    DsnKind.FAILURE: "Undelivered Mail Returned to Sender",
    DsnKind.DELAY: "Delayed Mail (still being retried)",
    DsnKind.RELAYED: "Successful Mail Delivery Report",
}
ACTIONS = {DsnKind.FAILURE: "failed", DsnKind.DELAY: "delayed", DsnKind.RELAYED: "relayed"}
_FALLBACK_STATUS = {DsnKind.FAILURE: "5.0.0", DsnKind.DELAY: "4.0.0", DsnKind.RELAYED: "2.0.0"}

# RET=FULL returns at most this much of the message (Postfix's bounce_size_limit, larger): a
# longer one is cut at a line end and the notice says so.
RETURN_FULL_LIMIT = 1024 * 1024

MAX_LINE = 998  # RFC 5321 line limit (octets, without CRLF)
MAX_DIAGNOSTIC = 900  # characters of a remote reply kept in a Diagnostic-Code field
REDACTED = "*****"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # C0, DEL, C1, Unicode breaks
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_DIAGNOSTIC = re.compile(r"^(smtp|x-[A-Za-z0-9-]+)\s*;\s*(.*)$", re.IGNORECASE)
# "C: AUTH PLAIN AGJvYgBzZWNyZXQ=" -> keep the mechanism, drop the initial response.
_AUTH_COMMAND = re.compile(r"(\bAUTH\s+[A-Za-z0-9_-]+)\s+\S.*$", re.IGNORECASE)
# Direction markers transports commonly prefix transcript lines with.
_DIRECTION = re.compile(r"^\s*(?:[CS]:|<<<|>>>|<-|->|<|>)?\s*")
_BASE64_TOKEN = re.compile(r"^[A-Za-z0-9+/]{4,}={0,2}$")
# Bare SMTP verbs that happen to be valid base64 too.
_BARE_VERBS = frozenset({"DATA", "QUIT", "RSET", "NOOP", "HELP", "STARTTLS", "TURN"})


def needs_dsn(sender: str, is_dsn: bool) -> bool:
    """Whether a failure of this message may be reported to its sender.

    Never to the null sender and never for a DSN itself: those are held for the operator
    instead (docs/delivery.md, "Bounces"), so two MTAs can never bounce notices at each other.
    """
    return not is_dsn and sender.strip() not in ("", "<>")


def requires_smtputf8(report: bytes) -> bool:
    """True when the DSN carries UTF-8 header fields and must be sent with SMTPUTF8."""
    return not report.isascii()


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as a single printable line: CR, LF and other controls become one space."""
    line = _CONTROL.sub(" ", text).strip()
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def scrub_transcript(lines: Iterable[str]) -> list[str]:
    """Transcript lines safe to mail: one line each, AUTH initial responses and the bare
    base64 lines of an AUTH exchange masked."""
    out: list[str] = []
    for raw in lines:
        line = one_line(raw, MAX_LINE - 10)
        if _AUTH_COMMAND.search(line):
            line = _AUTH_COMMAND.sub(rf"\1 {REDACTED}", line)
        else:
            prefix = _DIRECTION.match(line)
            rest = line[prefix.end():] if prefix else line
            # A line that is only a base64 token (no reply code, no verb) is an AUTH LOGIN /
            # CRAM-MD5 response or challenge; nothing else in SMTP looks like that.
            if (_BASE64_TOKEN.match(rest) and not rest.isdigit()
                    and rest.upper() not in _BARE_VERBS):
                line = line[: len(line) - len(rest)] + REDACTED
        out.append(line)
    return out


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _status(outcome: Outcome, kind: DsnKind) -> str:
    status = outcome.status.strip()
    return status if _STATUS.match(status) else _FALLBACK_STATUS[kind]


def _diagnostic_code(diagnostic: str) -> str | None:
    text = one_line(diagnostic, MAX_DIAGNOSTIC)
    if not text:
        return None
    found = _DIAGNOSTIC.match(text)
    if found:
        return f"{found.group(1).lower()}; {found.group(2)}"
    # Anything that is not an SMTP reply (DNS errors, connect failures) is our own text.
    return f"x-deliverd; {text}"


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def fold_field(name: str, value: str, width: int = 78) -> str:
    """``Name: value`` folded at spaces to ``width`` where it can be (a single longer word stays
    whole: it is still far below the 998-octet line limit), CRLF-terminated."""
    lines: list[str] = []
    current = f"{name}:"
    for word in one_line(value).split(" "):
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current.strip() != f"{name}:":
            lines.append(current)
            current = ""
        current += f" {word}"
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


def _field_block(fields: Sequence[tuple[str, str]], utf8: bool) -> str:
    # Built by hand rather than with email.message header objects: those turn a long word
    # into RFC 2047 encoded-words, which have no meaning in a delivery-status field.
    return "".join(
        fold_field(name, value if utf8 else value.encode("ascii", "replace").decode("ascii"))
        for name, value in fields
    )


def _recipient_block(
    outcome: Outcome, kind: DsnKind, utf8: bool, last_attempt: datetime,
    retry_until: datetime | None, orcpt: str | None,
) -> str:
    recipient = one_line(outcome.recipient)
    fields = []
    if orcpt is not None:
        addr_type, _, original = one_line(orcpt).partition(";")
        fields.append(("Original-Recipient", f"{addr_type}; {original}"))
    fields += [
        ("Final-Recipient", f"{_address_type(recipient)}; {recipient}"),
        ("Action", ACTIONS[kind]),
        ("Status", _status(outcome, kind)),
    ]
    if outcome.hop is not None:
        fields.append(("Remote-MTA", f"dns; {one_line(outcome.hop.host)}"))
    diagnostic = _diagnostic_code(outcome.diagnostic)
    if diagnostic is not None:
        fields.append(("Diagnostic-Code", diagnostic))
    fields.append(("Last-Attempt-Date", format_datetime(last_attempt)))
    if kind is DsnKind.DELAY and retry_until is not None:
        fields.append(("Will-Retry-Until", format_datetime(_aware(retry_until))))
    return _field_block(fields, utf8)


def _explanation(
    kind: DsnKind, reporting_mta: str, outcomes: Sequence[Outcome],
    retry_until: datetime | None, include_transcript: bool,
) -> str:
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    if kind is DsnKind.FAILURE:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "Its headers are attached below. The details of each failure follow.",
        ]
    elif kind is DsnKind.RELAYED:
        lines += [
            "Your message was relayed to the destinations listed below, as you asked to be",
            "told of successful delivery. The next system does not offer delivery status",
            "notifications, so no further notice of success will come from it; you may",
            "still receive a notice of failure from systems further on.",
        ]
    else:
        lines += [
            "Your message has not been delivered yet to one or more recipients.",
            "This is only a warning: delivery is still being retried and you do not",
            "need to send the message again.",
        ]
        if retry_until is not None:
            until = format_datetime(_aware(retry_until))
            lines.append(f"Delivery will be retried until {until}; if it still fails")
            lines.append("then, you will receive a notice that it was returned.")
    lines.append("")
    what = {DsnKind.FAILURE: "delivery failed", DsnKind.RELAYED: "relayed",
            DsnKind.DELAY: "delivery delayed, still retrying"}[kind]
    for outcome in outcomes:
        lines.append(f"<{one_line(outcome.recipient)}>: {what}")
        if outcome.hop is not None:
            lines.append(f"    Remote server: {one_line(outcome.hop.relay)}")
        lines.append(f"    Status: {one_line(outcome.status)}")
        if outcome.diagnostic:
            lines.append(f"    Reason: {one_line(outcome.diagnostic, MAX_DIAGNOSTIC)}")
        lines.append("")
    if include_transcript:
        lines += _transcripts(outcomes)
    return "\n".join(lines) + "\n"


def _transcripts(outcomes: Sequence[Outcome]) -> list[str]:
    lines: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for outcome in outcomes:
        # Recipients of one transaction share one transcript: print it once.
        if not outcome.transcript or outcome.transcript in seen:
            continue
        seen.add(outcome.transcript)
        where = one_line(outcome.hop.relay) if outcome.hop else "the remote server"
        lines.append(f"--- SMTP transcript of the session with {where} ---")
        lines += scrub_transcript(outcome.transcript)
        lines.append("")
    return lines


def original_headers(original: bytes) -> bytes:
    """The header section of a message (up to the first empty line), CRLF, lines capped."""
    text = original.replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    head = text if end < 0 else text[: end + 1]
    lines = [line[:MAX_LINE] for line in head.split(b"\n") if line]
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)


def returned_message(prefix: bytes, total: int, limit: int = RETURN_FULL_LIMIT) -> bytes:
    """What RET=FULL returns of a message of ``total`` octets whose first octets are
    ``prefix`` (more than ``limit`` of them, or all): its lines with CRLF line ends, as many
    whole lines as fit in ``limit`` octets."""
    lines = prefix.replace(b"\r\n", b"\n").split(b"\n")
    tail = lines.pop()  # after the last line end: a whole message's last line, or cut off
    if tail and len(prefix) >= total:
        lines.append(tail)
    out = bytearray()
    for line in lines:
        piece = line.rstrip(b"\r")[:MAX_LINE] + b"\r\n"
        if len(out) + len(piece) > limit:
            break
        out += piece
    return bytes(out)


def _return_note(returned: bytes | None, total: int) -> str:
    if returned is None:
        return ""
    if len(returned) >= total:
        return "\nThe message is returned in full below.\n"
    return (f"\nThe message was {total} bytes long; only its first {len(returned)} bytes are"
            " returned below (cut at a line end).\n")


def _headers_part(original: bytes) -> EmailMessage:
    part = EmailMessage(policy=email_policy.SMTP)
    head = original_headers(original)
    if head.isascii():
        part.set_content(head.decode("ascii"), subtype="rfc822-headers", charset="us-ascii",
                         cte="7bit")
    else:
        # 8-bit header text (UTF-8 or a legacy charset): quoted-printable keeps it readable
        # and means this part never needs an 8-bit transport.
        part.set_content(head.decode("utf-8", "replace"), subtype="rfc822-headers",
                         charset="utf-8", cte="quoted-printable")
    del part["MIME-Version"]
    return part


class _DsnGenerator(BytesGenerator):
    """Writes our delivery-status text (already folded, CRLF) verbatim, UTF-8 for RFC 6533."""

    def _handle_message_delivery_status(self, msg: Message) -> None:
        payload = msg.get_payload()
        assert isinstance(payload, str)
        # write() takes str and encodes it ascii/surrogateescape: smuggle the UTF-8 through.
        self.write(payload.encode("utf-8").decode("ascii", "surrogateescape"))

    _handle_message_global_delivery_status = _handle_message_delivery_status


def build_dsn(
    *,
    kind: DsnKind,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    arrival: datetime,
    original: bytes,
    outcomes: Sequence[Outcome],
    include_transcript: bool,
    now: datetime | None = None,
    retry_until: datetime | None = None,
    postmaster: str | None = None,
    to: str | None = None,
    envid: str | None = None,
    orcpts: Mapping[str, str] | None = None,
    returned: bytes | None = None,
    size: int = 0,
) -> bytes:
    """The DSN for ``outcomes`` of one message, as CRLF bytes ready to enqueue from ``<>``.

    ``to`` overrides the recipient (the postmaster copy); ``postmaster``, when given, is named
    in the text as the address to ask for help. ``retry_until`` feeds Will-Retry-Until and the
    text of a delay notice. ``envid`` (RFC 3461 ENVID) becomes Original-Envelope-Id and
    ``orcpts`` (recipient -> ORCPT as ``type;address``) Original-Recipient. ``returned``
    (RET=FULL, see ``returned_message``) is attached as message/rfc822 instead of the
    headers of ``original``; ``size`` is the whole message's, to say when it was cut.
    """
    recipient = _notice_recipient(kind, outcomes, to if to is not None else original_sender)
    moment = _aware(now or datetime.now(UTC))
    addresses = [recipient, original_sender, *(o.recipient for o in outcomes)]
    utf8 = not all(a.isascii() for a in addresses)
    pol = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP

    report = _report_head(pol, kind, reporting_mta, recipient, moment)
    text = _explanation(kind, reporting_mta, outcomes, retry_until, include_transcript)
    if returned is not None:
        text = text.replace("Its headers are attached below.", "It is returned below.")
        text += _return_note(returned, size)
    if postmaster:
        text += f"\nFor further assistance, please contact <{one_line(postmaster)}>.\n"
    _set_human_part(report, text)

    per_message = [] if envid is None else [("Original-Envelope-Id", one_line(envid))]
    per_message += [
        ("Reporting-MTA", f"dns; {reporting_mta}"),
        ("X-Deliverd-Queue-ID", queue_id),
        ("Arrival-Date", format_datetime(_aware(arrival))),
    ]
    per_recipient = [
        _recipient_block(o, kind, utf8, moment, retry_until, (orcpts or {}).get(o.recipient))
        for o in outcomes
    ]
    report.attach(_status_part(pol, utf8, [_field_block(per_message, utf8), *per_recipient]))
    return _flatten(report, pol, original, returned)


def _notice_recipient(kind: DsnKind, outcomes: Sequence[Outcome], to: str) -> str:
    """Who the notice goes to, after the checks that no caller may get past."""
    if not outcomes:
        raise ValueError("a DSN needs at least one recipient outcome")
    if any((o.kind is Kind.DELIVERED) != (kind is DsnKind.RELAYED) for o in outcomes):
        raise ValueError("a relayed notice reports delivered recipients only, the others none")
    recipient = one_line(to)
    if recipient in ("", "<>"):
        raise ValueError("a DSN is never sent to the null sender")
    return recipient


def _report_head(
    pol: email_policy.EmailPolicy[EmailMessage], kind: DsnKind, reporting_mta: str,
    recipient: str, moment: datetime,
) -> EmailMessage:
    """The notice's header fields, from the mailer daemon of ``reporting_mta``."""
    report = EmailMessage(policy=pol)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{one_line(reporting_mta)}>"
    report["To"] = recipient
    report["Subject"] = SUBJECTS[kind]
    report["Date"] = format_datetime(moment)
    report["Message-ID"] = make_msgid(domain=one_line(reporting_mta))
    report["Auto-Submitted"] = "auto-replied"
    return report


def _set_human_part(report: EmailMessage, text: str) -> None:
    """The text for people, first part of a multipart/report of type delivery-status."""
    # Remote replies may be non-ASCII: quoted-printable keeps the report 7-bit clean then.
    report.set_content(text, charset="utf-8",
                       cte=None if text.isascii() else "quoted-printable")
    report.make_mixed()
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")


def _status_part(
    pol: email_policy.EmailPolicy[EmailMessage], utf8: bool, blocks: list[str]
) -> EmailMessage:
    """The machine-readable part: the per-message block, then one block per recipient."""
    status = EmailMessage(policy=pol)
    status["Content-Type"] = (
        "message/global-delivery-status" if utf8 else "message/delivery-status"
    )
    status.set_payload("\r\n".join(blocks))
    return status


def _flatten(
    report: EmailMessage, pol: email_policy.EmailPolicy[EmailMessage], original: bytes,
    returned: bytes | None,
) -> bytes:
    """The notice as CRLF bytes, with the original's headers or the returned message last."""
    if returned is None:
        report.attach(_headers_part(original))
    else:
        report.set_boundary(_boundary_not_in(returned))
    out = io.BytesIO()
    _DsnGenerator(out, policy=pol.clone(linesep="\r\n")).flatten(report)
    if returned is None:
        return out.getvalue()
    return _with_message_part(out.getvalue(), report.get_boundary(), returned)


def _boundary_not_in(message: bytes) -> str:
    while True:
        boundary = f"=_deliverd_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in message:
            return boundary


def _with_message_part(report: bytes, boundary: str | None, message: bytes) -> bytes:
    """``report`` with ``message`` as its last part (message/rfc822), written as it is: the
    email package would parse it and write it again. The boundary was chosen by
    ``_boundary_not_in`` the message, which is the one text the generator does not see."""
    assert boundary is not None
    delimiter = b"--" + boundary.encode("ascii")
    closing = delimiter + b"--"
    head, found, _tail = report.rpartition(closing)
    if not found:
        raise ValueError("no closing boundary in the report")
    encoding = b"7bit" if message.isascii() else b"8bit"
    return (head + delimiter + b"\r\nContent-Type: message/rfc822\r\n"
            b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + message
            + b"\r\n" + closing + b"\r\n")
