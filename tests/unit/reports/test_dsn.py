"""RFC 3464 DSNs: structure, per-recipient fields, safety against hostile replies, SMTPUTF8."""

from __future__ import annotations

import email
import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deliverd.core.outcomes import Hop, Kind, Outcome, Route
from deliverd.reports.dsn import (
    DsnKind,
    build_dsn,
    fold_field,
    needs_dsn,
    original_headers,
    requires_smtputf8,
    scrub_transcript,
)

MTA = "relay.example.test"
SENDER = "alice@example.test"
ARRIVAL = datetime(2025, 3, 1, 10, 0, 0, tzinfo=UTC)
NOW = ARRIVAL + timedelta(hours=1)
MX = Hop("mx1.example.test", "127.0.0.11", 2525, Route.DIRECT)
ORIGINAL = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"The body is private and must not come back in a DSN.\r\n"
)
TRANSCRIPT = (
    "S: 220 mx1.example.test ESMTP",
    "C: EHLO relay.example.test",
    "C: AUTH PLAIN AGFsaWNlAHMzY3IzdA==",
    "S: 235 2.7.0 ok",
    "C: RCPT TO:<bob@example.test>",
    "S: 550 5.1.1 no such user",
)
BOUNCED = Outcome("bob@example.test", Kind.BOUNCED, "5.1.1", "smtp; 550 5.1.1 no such user",
                  MX, TRANSCRIPT)
DEFERRED = Outcome("carol@example.test", Kind.DEFERRED, "4.4.1",
                   "x-deliverd; connection refused by mx2.example.test")


def dsn(
    outcomes: list[Outcome], kind: DsnKind = DsnKind.FAILURE, **kw: object
) -> EmailMessage:
    return parse(dsn_bytes(outcomes, kind, **kw))


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def dsn_bytes(outcomes: list[Outcome], kind: DsnKind = DsnKind.FAILURE, **kw: object) -> bytes:
    args: dict[str, object] = {
        "kind": kind, "reporting_mta": MTA, "original_sender": SENDER, "queue_id": "3F2A9C1B7D4E",
        "arrival": ARRIVAL, "original": ORIGINAL, "outcomes": outcomes,
        "include_transcript": True, "now": NOW,
        "retry_until": ARRIVAL + timedelta(days=2),
    }
    args.update(kw)
    return build_dsn(**args)  # type: ignore[arg-type]


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def recipient_blocks(msg: EmailMessage) -> dict[str, Message]:
    return {str(b["Final-Recipient"]).split(";", 1)[1].strip(): b
            for b in status_blocks(msg)[1:]}


def text_part(msg: EmailMessage) -> str:
    part = parts(msg)[0]
    assert isinstance(part, EmailMessage)
    return part.get_content()  # type: ignore[no-any-return]


def test_failure_dsn_parses_back_as_multipart_report_with_three_parts() -> None:
    msg = dsn([BOUNCED])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not msg.defects and not any(p.defects for p in parts(msg))


def test_dsn_is_from_mailer_daemon_to_the_original_sender() -> None:
    msg = dsn([BOUNCED])
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert str(msg["To"]) == SENDER
    assert str(msg["Subject"]) == "Undelivered Mail Returned to Sender"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["Message-ID"]).endswith(f"@{MTA}>")
    assert msg["Date"].datetime == NOW


def test_to_can_be_overridden_for_the_postmaster_copy() -> None:
    msg = dsn([BOUNCED], to="postmaster@relay.example.test", postmaster="postmaster@x.test")
    assert str(msg["To"]) == "postmaster@relay.example.test"
    assert "<postmaster@x.test>" in text_part(msg)


def test_per_message_fields_name_the_reporting_mta_queue_id_and_arrival() -> None:
    fields = status_blocks(dsn([BOUNCED]))[0]
    assert fields["Reporting-MTA"] == f"dns; {MTA}"
    assert fields["X-Deliverd-Queue-ID"] == "3F2A9C1B7D4E"
    assert fields["Arrival-Date"] == "Sat, 01 Mar 2025 10:00:00 +0000"


@pytest.mark.parametrize(
    ("status", "diagnostic", "expected_status", "expected_diagnostic"),
    [
        ("5.1.1", "smtp; 550 5.1.1 no such user", "5.1.1", "smtp; 550 5.1.1 no such user"),
        ("5.1.2", "dns; NXDOMAIN for nowhere.test", "5.1.2",
         "x-deliverd; dns; NXDOMAIN for nowhere.test"),
        ("5.1.10", "x-deliverd; null MX", "5.1.10", "x-deliverd; null MX"),
        ("5.7.1", "SMTP;554 5.7.1 rejected", "5.7.1", "smtp; 554 5.7.1 rejected"),
        ("garbage", "550 refused", "5.0.0", "x-deliverd; 550 refused"),
    ],
)
def test_recipient_status_and_diagnostic_code_follow_the_outcome(
    status: str, diagnostic: str, expected_status: str, expected_diagnostic: str
) -> None:
    outcome = Outcome("bob@example.test", Kind.BOUNCED, status, diagnostic, MX)
    block = recipient_blocks(dsn([outcome]))["bob@example.test"]
    assert block["Final-Recipient"] == "rfc822; bob@example.test"
    assert block["Status"] == expected_status
    assert block["Diagnostic-Code"] == expected_diagnostic
    assert block["Last-Attempt-Date"] == "Sat, 01 Mar 2025 11:00:00 +0000"


def test_each_recipient_gets_its_own_block_with_its_own_status() -> None:
    blocks = recipient_blocks(dsn([BOUNCED, DEFERRED]))
    assert {k: b["Status"] for k, b in blocks.items()} == {
        "bob@example.test": "5.1.1", "carol@example.test": "4.4.1"}


@pytest.mark.parametrize(
    ("kind", "action", "subject", "will_retry"),
    [
        (DsnKind.FAILURE, "failed", "Undelivered Mail Returned to Sender", None),
        (DsnKind.DELAY, "delayed", "Delayed Mail (still being retried)",
         "Mon, 03 Mar 2025 10:00:00 +0000"),
    ],
)
def test_action_and_will_retry_until_depend_on_the_dsn_kind(
    kind: DsnKind, action: str, subject: str, will_retry: str | None
) -> None:
    msg = dsn([DEFERRED], kind)
    block = recipient_blocks(msg)["carol@example.test"]
    assert block["Action"] == action
    assert block["Will-Retry-Until"] == will_retry
    assert str(msg["Subject"]) == subject
    if kind is DsnKind.DELAY:
        assert "retried until Mon, 03 Mar 2025 10:00:00 +0000" in text_part(msg)


def test_remote_mta_is_present_only_when_there_was_a_hop() -> None:
    blocks = recipient_blocks(dsn([BOUNCED, DEFERRED]))
    assert blocks["bob@example.test"]["Remote-MTA"] == "dns; mx1.example.test"
    assert "Remote-MTA" not in blocks["carol@example.test"]


EXPECTED_FIELDS = {"Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
                   "Last-Attempt-Date"}


@settings(max_examples=150, deadline=None)
@given(reply=st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_hostile_reply_cannot_inject_fields_or_break_the_structure(reply: str) -> None:
    diagnostic = f"smtp; 550 {reply}\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; x@y"
    outcome = Outcome("bob@example.test", Kind.BOUNCED, "5.0.0", diagnostic, MX, (reply,))
    raw = dsn_bytes([outcome])
    msg = parse(raw)
    assert len(parts(msg)) == 3
    blocks = status_blocks(msg)
    assert len(blocks) == 2
    assert set(blocks[1].keys()) == EXPECTED_FIELDS
    assert "X-Injected" not in msg and "X-Injected" not in blocks[1]
    assert not requires_smtputf8(raw)  # an ASCII envelope never needs SMTPUTF8
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_long_diagnostic_is_folded_and_unfolds_to_the_same_text() -> None:
    words = " ".join(f"word{i}" for i in range(60))
    outcome = Outcome("bob@example.test", Kind.BOUNCED, "5.0.0", f"smtp; 550 {words}", MX)
    raw = dsn_bytes([outcome])
    field = re.search(rb"Diagnostic-Code:.*?\r\n(?! )", raw, re.S)
    assert field is not None
    lines = field.group(0).split(b"\r\n")[:-1]
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    block = recipient_blocks(parse(raw))
    assert block["bob@example.test"]["Diagnostic-Code"] == f"smtp; 550 {words}"


def test_fold_field_keeps_an_overlong_word_whole_on_its_own_line() -> None:
    word = "x" * 120
    assert fold_field("Diagnostic-Code", f"smtp; 550 {word}") == (
        f"Diagnostic-Code: smtp; 550\r\n {word}\r\n")


@pytest.mark.parametrize("include", [True, False])
def test_transcript_is_included_only_when_asked(include: bool) -> None:
    text = text_part(dsn([BOUNCED], include_transcript=include))
    assert ("S: 550 5.1.1 no such user" in text) is include
    assert ("C: RCPT TO:<bob@example.test>" in text) is include


def test_transcript_shared_by_recipients_of_one_transaction_is_printed_once() -> None:
    other = Outcome("dave@example.test", Kind.BOUNCED, "5.1.1", "smtp; 550 5.1.1 no", MX,
                    TRANSCRIPT)
    assert text_part(dsn([BOUNCED, other])).count("C: EHLO relay.example.test") == 1


def test_transcript_never_shows_an_auth_payload() -> None:
    text = text_part(dsn([BOUNCED]))
    assert "AGFsaWNlAHMzY3IzdA==" not in text
    assert "C: AUTH PLAIN *****" in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("C: AUTH PLAIN AGJvYgBwdw==", "C: AUTH PLAIN *****"),
        ("C: auth login Ym9i", "C: auth login *****"),
        ("C: AUTH CRAM-MD5", "C: AUTH CRAM-MD5"),
        ("S: 334 VXNlcm5hbWU6", "S: 334 VXNlcm5hbWU6"),
        ("C: cGFzc3dvcmQ=", "C: *****"),
        (">>> Ym9iIGhtYWM=", ">>> *****"),
        ("cGFzc3dvcmQ=", "*****"),
        ("C: DATA", "C: DATA"),
        ("C: QUIT", "C: QUIT"),
        ("S: 250 2.0.0 Ok: queued as X", "S: 250 2.0.0 Ok: queued as X"),
        ("S: 550\r\nX-Injected: yes", "S: 550 X-Injected: yes"),
    ],
)
def test_scrub_transcript_masks_auth_material_and_keeps_the_rest(
    line: str, expected: str
) -> None:
    assert scrub_transcript([line]) == [expected]


def test_original_headers_come_back_but_never_the_body() -> None:
    raw = dsn_bytes([BOUNCED])
    assert b"The body is private" not in raw
    headers = parts(parse(raw))[2]
    text = headers.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert text == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        (b"Subject: a\nX: b\n\nbody\n", b"Subject: a\r\nX: b\r\n"),
        (b"Subject: only headers\r\n", b"Subject: only headers\r\n"),
        (b"Subject: " + b"y" * 2000 + b"\r\n\r\nbody", b"Subject: " + b"y" * 989 + b"\r\n"),
        (b"", b""),
    ],
)
def test_original_headers_are_cut_at_the_first_empty_line_with_crlf(
    original: bytes, expected: bytes
) -> None:
    assert original_headers(original) == expected


def test_every_line_is_crlf_terminated_and_within_smtp_limits() -> None:
    raw = dsn_bytes([BOUNCED, DEFERRED])
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert not requires_smtputf8(raw)


def test_utf8_recipient_makes_an_rfc6533_global_report() -> None:
    outcome = Outcome("bøb@exämple.test", Kind.BOUNCED, "5.1.1", "smtp; 550 5.1.1 unknown", MX)
    raw = dsn_bytes([outcome], original_sender="ålice@example.test")
    assert requires_smtputf8(raw)
    assert "To: ålice@example.test\r\n".encode() in raw
    assert b"Content-Type: message/global-delivery-status" in raw
    assert "Final-Recipient: utf-8; bøb@exämple.test\r\n".encode() in raw
    msg = parse(raw)
    assert str(msg["To"]) == "ålice@example.test"
    assert "<bøb@exämple.test>: delivery failed" in text_part(msg)


def test_non_ascii_original_headers_are_transfer_encoded_not_sent_raw() -> None:
    original = "Subject: Grüße\r\n\r\nbody".encode()
    raw = dsn_bytes([BOUNCED], original=original)
    assert raw.isascii()
    headers = parts(parse(raw))[2]
    assert "Subject: Grüße" in headers.get_content()  # type: ignore[attr-defined]


def test_non_ascii_reply_in_an_ascii_report_is_replaced_not_encoded() -> None:
    outcome = Outcome("bob@example.test", Kind.BOUNCED, "5.0.0", "smtp; 550 Benutzer unbekännt",
                      MX)
    raw = dsn_bytes([outcome])
    assert raw.isascii()
    msg = parse(raw)
    block = recipient_blocks(msg)["bob@example.test"]
    assert block["Diagnostic-Code"] == "smtp; 550 Benutzer unbek?nnt"
    assert "Benutzer unbekännt" in text_part(msg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outcomes": []}, "at least one"),
        ({"outcomes": [Outcome("b@x.test", Kind.DELIVERED, "2.0.0", "smtp; 250 ok")]},
         "delivered"),
        ({"original_sender": ""}, "null sender"),
        ({"original_sender": "<>"}, "null sender"),
    ],
)
def test_impossible_reports_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"outcomes": [BOUNCED], **kwargs}
    with pytest.raises(ValueError, match=message):
        dsn_bytes(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sender", "is_dsn", "expected"),
    [
        ("alice@example.test", False, True),
        ("alice@example.test", True, False),  # a DSN that fails is held, never bounced
        ("", False, False),  # never to the null sender
        ("<>", False, False),
        ("  ", False, False),
    ],
)
def test_needs_dsn_never_for_null_sender_or_a_dsn(
    sender: str, is_dsn: bool, expected: bool
) -> None:
    assert needs_dsn(sender, is_dsn) is expected
