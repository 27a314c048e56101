"""Attempt and event log lines (text and JSON), the redaction guard and the logging setup."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deliverd.core.outcomes import Hop, Kind, Outcome, Route
from deliverd.ops.logline import (
    REPLY_MAX,
    configure_logging,
    dsn_sent,
    enqueued,
    format_attempt,
    format_delay,
    format_event,
    redact,
)

QID = "3F2A9C1B7D4E"
MX = Hop("mx1.example.test", "127.0.0.11", 2525, Route.DIRECT)
RELAY = Hop("smarthost.example.test", "127.0.0.12", 587, Route.SMARTHOST)
WHEN = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

OUTCOMES = {
    Kind.DELIVERED: Outcome("bob@example.test", Kind.DELIVERED, "2.0.0",
                            "smtp; 250 2.0.0 Ok: queued as X", MX),
    Kind.DEFERRED: Outcome("bob@example.test", Kind.DEFERRED, "4.7.1",
                           "smtp; 451 4.7.1 greylisted", RELAY),
    Kind.BOUNCED: Outcome("bob@example.test", Kind.BOUNCED, "5.1.1",
                          "smtp; 550 5.1.1 no such user", MX),
    Kind.HELD: Outcome("bob@example.test", Kind.HELD, "5.4.6",
                       "x-deliverd; mail loops back to myself"),
}

TEXT_LINES = {
    Kind.DELIVERED: "3F2A9C1B7D4E: to=<bob@example.test>, relay=mx1.example.test[127.0.0.11]:2525,"
    " route=direct, delay=1.2, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)",
    Kind.DEFERRED: "3F2A9C1B7D4E: to=<bob@example.test>,"
    " relay=smarthost.example.test[127.0.0.12]:587, route=smarthost, delay=1.2, dsn=4.7.1,"
    " status=deferred (451 4.7.1 greylisted)",
    Kind.BOUNCED: "3F2A9C1B7D4E: to=<bob@example.test>, relay=mx1.example.test[127.0.0.11]:2525,"
    " route=direct, delay=1.2, dsn=5.1.1, status=bounced (550 5.1.1 no such user)",
    Kind.HELD: "3F2A9C1B7D4E: to=<bob@example.test>, relay=none, route=none, delay=1.2,"
    " dsn=5.4.6, status=held (mail loops back to myself)",
}


@pytest.mark.parametrize("kind", list(Kind))
def test_text_line_is_postfix_like_for_each_kind(kind: Kind) -> None:
    line = format_attempt(queue_id=QID, outcome=OUTCOMES[kind], delay=1.2)
    assert line == TEXT_LINES[kind]


@pytest.mark.parametrize("kind", list(Kind))
def test_json_line_has_the_same_fields_plus_ts(kind: Kind) -> None:
    outcome = OUTCOMES[kind]
    line = format_attempt(queue_id=QID, outcome=outcome, delay=1.2, fmt="json", now=WHEN)
    assert "\n" not in line
    record = json.loads(line)
    assert record == {
        "ts": "2025-03-01T12:00:00.000Z",
        "queue_id": QID,
        "to": "bob@example.test",
        "relay": outcome.relay,
        "route": outcome.route.value if outcome.route else "none",
        "delay": 1.2,
        "dsn": outcome.status,
        "status": kind.value,
        "reply": TEXT_LINES[kind].rsplit(" (", 1)[1].rstrip(")"),
    }


def test_route_sender_and_extra_fields_appear_in_both_formats() -> None:
    outcome = OUTCOMES[Kind.DELIVERED]
    text = format_attempt(queue_id=QID, outcome=outcome, delay=0.25, route="smarthost",
                          sender="alice@example.test", extra={"tls": "TLSv1.3"})
    assert text == (
        "3F2A9C1B7D4E: to=<bob@example.test>, from=<alice@example.test>,"
        " relay=mx1.example.test[127.0.0.11]:2525, route=smarthost, delay=0.25, dsn=2.0.0,"
        " tls=TLSv1.3, status=sent (250 2.0.0 Ok: queued as X)"
    )
    record = json.loads(format_attempt(queue_id=QID, outcome=outcome, delay=0.25, fmt="json",
                                       route="smarthost", sender="alice@example.test",
                                       extra={"tls": "TLSv1.3"}))
    assert (record["from"], record["route"], record["tls"]) == (
        "alice@example.test", "smarthost", "TLSv1.3")


@pytest.mark.parametrize("name", ["status", "to", "relay", "Bad-Name", "ts"])
def test_extra_field_may_not_shadow_or_break_the_standard_fields(name: str) -> None:
    with pytest.raises(ValueError):
        format_attempt(queue_id=QID, outcome=OUTCOMES[Kind.DELIVERED], delay=1,
                       extra={name: "x"})


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        format_attempt(queue_id=QID, outcome=OUTCOMES[Kind.DELIVERED], delay=1, fmt="xml")


def test_hostile_reply_cannot_forge_a_second_log_line_and_is_capped() -> None:
    evil = "smtp; 550 nope\r\n3F2A9C1B7D4E: to=<x@y>, status=sent (250 ok)\x1b[31m" + "A" * 2000
    outcome = Outcome("bob@example.test", Kind.BOUNCED, "5.0.0", evil, MX)
    line = format_attempt(queue_id=QID, outcome=outcome, delay=1)
    assert "\r" not in line and "\n" not in line and "\x1b" not in line
    reply = line.split("status=bounced (", 1)[1][:-1]
    assert len(reply) == REPLY_MAX and reply.endswith("...")


@given(diagnostic=st.text(), recipient=st.text(min_size=1))
def test_any_reply_yields_exactly_one_line_in_either_format(
    diagnostic: str, recipient: str
) -> None:
    outcome = Outcome(recipient, Kind.DEFERRED, "4.0.0", diagnostic, MX)
    text = format_attempt(queue_id=QID, outcome=outcome, delay=3)
    assert text.splitlines() == [text]
    record = json.loads(format_attempt(queue_id=QID, outcome=outcome, delay=3, fmt="json"))
    for value in (record["reply"], record["to"]):
        assert value.splitlines() in ([], [value])
        assert not any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0"), (0.004, "0"), (0.05, "0.05"), (1.2, "1.2"), (1.25, "1.25"), (12.5, "12.5"),
     (99.994, "99.99"), (100.4, "100"), (4123.7, "4124"), (-3, "0")],
)
def test_delay_is_formatted_like_postfix(seconds: float, text: str) -> None:
    assert format_delay(seconds) == text


def test_events_in_text_and_json() -> None:
    assert enqueued(QID, sender="alice@example.test", size=1234, nrcpt=2) == (
        "3F2A9C1B7D4E: from=<alice@example.test>, size=1234, nrcpt=2"
    )
    assert format_event(QID, "expired, returned to sender") == (
        "3F2A9C1B7D4E: expired, returned to sender"
    )
    assert dsn_sent(QID, "9A8B7C") == (
        "3F2A9C1B7D4E: sender non-delivery notification: 9A8B7C"
    )
    assert dsn_sent(QID, "9A8B7C", delay_notice=True).endswith("delay notification: 9A8B7C")
    record = json.loads(format_event(QID, "held", fmt="json", now=WHEN, reason="loop"))
    assert record == {"ts": "2025-03-01T12:00:00.000Z", "queue_id": QID, "message": "held",
                      "reason": "loop"}
    record = json.loads(enqueued(QID, sender="a@b", size=5, nrcpt=1, fmt="json"))
    assert (record["from"], record["size"], record["nrcpt"]) == ("<a@b>", 5, 1)


def test_event_message_is_scrubbed_of_line_breaks() -> None:
    assert format_event(QID, "held\nFAKE: line") == "3F2A9C1B7D4E: held FAKE: line"


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("login hunter2 ok", ["hunter2"], "login ***** ok"),
        ("hunter2hunter2", ["hunter2"], "**********"),
        ("C: aHVudGVyMg==", ["hunter2"], "C: *****"),  # base64, as AUTH LOGIN sends it
        ("pw=abcdef", ["abc", "abcdef"], "pw=*****"),  # longest secret masked whole
        ("nothing here", ["", "zzz"], "nothing here"),  # an empty secret masks nothing
    ],
)
def test_redact_masks_secrets_and_their_base64(
    text: str, secrets: list[str], expected: str
) -> None:
    assert redact(text, secrets) == expected


@pytest.fixture
def isolated_logger() -> Iterator[str]:
    name = "deliverd.test_logline"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_text_logging_writes_one_line_per_record_even_with_a_traceback(
    isolated_logger: str,
) -> None:
    stream = io.StringIO()
    configure_logging("text", "info", stream, logger_name=isolated_logger)
    log = logging.getLogger(isolated_logger)
    log.info(format_attempt(queue_id=QID, outcome=OUTCOMES[Kind.DELIVERED], delay=1.2))
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("delivery crashed")
    log.debug("not shown at info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(TEXT_LINES[Kind.DELIVERED])
    assert "delivery crashed" in lines[1] and "RuntimeError: boom\\nsecond line" in lines[1]


def test_json_logging_merges_json_attempt_lines_and_wraps_plain_messages(
    isolated_logger: str,
) -> None:
    stream = io.StringIO()
    configure_logging("json", logging.INFO, stream, logger_name=isolated_logger)
    log = logging.getLogger(isolated_logger)
    outcome = OUTCOMES[Kind.BOUNCED]
    log.warning(format_attempt(queue_id=QID, outcome=outcome, delay=2, fmt="json"))
    log.info("reloaded %s", "config")
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert (first["status"], first["queue_id"], first["level"]) == ("bounced", QID, "warning")
    assert first["logger"] == isolated_logger
    assert (second["message"], second["level"]) == ("reloaded config", "info")
    assert "ts" in second


def test_configured_secrets_never_reach_the_stream(isolated_logger: str) -> None:
    stream = io.StringIO()
    configure_logging("text", "info", stream, secrets=["s3cr3t-pw"],
                      logger_name=isolated_logger)
    log = logging.getLogger(isolated_logger)
    log.error("auth failed with %s", "s3cr3t-pw")
    try:
        raise ValueError("password was s3cr3t-pw")
    except ValueError:
        log.exception("oops")
    output = stream.getvalue()
    assert "s3cr3t-pw" not in output
    assert "auth failed with *****" in output
    assert "ValueError: password was *****" in output


def test_reconfiguring_replaces_the_handler_instead_of_duplicating_lines(
    isolated_logger: str,
) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", "info", first, logger_name=isolated_logger)
    configure_logging("json", "info", second, secrets=["pw1"], logger_name=isolated_logger)
    logging.getLogger(isolated_logger).info("hello pw1")
    assert first.getvalue() == ""
    assert [json.loads(x)["message"] for x in second.getvalue().splitlines()] == ["hello *****"]
