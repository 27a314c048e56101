"""RFC 3461 end to end with real servers: the listener's DSN parameters, what reaches a real
Postfix next hop (which offers DSN) and what we report for an aiosmtpd hop (which does not),
NOTIFY=NEVER, RET=HDRS against RET=FULL, and ``sendmail -N -R -V`` through the maildrop."""

from __future__ import annotations

import email
import smtplib
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from flufl.bounce import all_failures

from deliverd.reports.dsn import RETURN_FULL_LIMIT
from deliverd_lab.postfix import PostfixRelay
from tests.fixtures.engine import Engine, free_port, textfile_samples
from tests.fixtures.mailservers import _require
from tests.fixtures.mta import MtaHost
from tests.fixtures.smtp_sink import ReceivedMessage, Sink

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDER = "app@deliverd.test"
MARKER = "the-body-only-ret-full-returns"
BODY = f"First line.\n{MARKER}\n"


def engine_to(
    engine_factory: Callable[..., Engine], port: int, **extra: Any
) -> Engine:
    spec: dict[str, Any] = {
        "routing": {"mode": "smarthost", "smarthost": {
            "host": "127.0.0.1", "port": port, "tls": "none", "bounce_on_5xx": True}},
        # One message in, one attempt: no delay notice next to what a test looks for.
        "dsn": {"notify_delayed": False, "include_transcript": False},
        **extra,
    }
    return engine_factory(spec)


def submit(
    engine: Engine, mail_params: list[str], rcpts: list[tuple[str, list[str]]],
    body: str = BODY,
) -> str:
    to = ", ".join(r for r, _ in rcpts)
    text = f"From: {SENDER}\r\nTo: {to}\r\nSubject: dsn test\r\n\r\n{body}"
    with smtplib.SMTP("127.0.0.1", engine.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("dsn")
        code, msg = smtp.mail(SENDER, mail_params)
        assert code == 250, msg
        for rcpt, params in rcpts:
            code, msg = smtp.rcpt(rcpt, params)
            assert code == 250, msg
        code, msg = smtp.data(text.encode())
        assert code == 250, msg
    return msg.decode().rsplit(" ", 1)[-1]


def notices(sink: Sink) -> list[ReceivedMessage]:
    return [m for m in sink.messages if m.mail_from in ("", "<>")]


def report_fields(data: bytes) -> tuple[Message, list[Message]]:
    """The per-message fields and the per-recipient blocks of a DSN."""
    msg = email.message_from_bytes(data)
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks[0], blocks[1:]


# -- the listener -------------------------------------------------------------------------------


def test_listener_keeps_dsn_parameters_and_refuses_malformed_ones_with_501(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    smtp_sink("127.0.0.1", port, rcpt={"kept@dest.test": "451 4.3.0 try later"})
    engine = engine_to(engine_factory, port)
    with smtplib.SMTP("127.0.0.1", engine.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("dsn")
        for bad in (["RET=BODY"], ["ENVID=a+zz"], ["RET=FULL", "RET=HDRS"]):
            code, msg = smtp.mail(SENDER, bad)
            assert (code, msg[:5]) == (501, b"5.5.4"), bad
        code, _ = smtp.mail(SENDER, ["RET=hdrs", "ENVID=Mixed+2BCase-1", "SIZE=100"])
        assert code == 250
        for bad in (["NOTIFY=NEVER,SUCCESS"], ["ORCPT=no-type"], ["NOTIFY=SOMETIMES"]):
            code, msg = smtp.rcpt("kept@dest.test", bad)
            assert (code, msg[:5]) == (501, b"5.5.4"), bad
        code, _ = smtp.rcpt("kept@dest.test", ["XUNKNOWN=1"])
        assert code == 555  # aiosmtpd still refuses what nobody implements
        code, _ = smtp.rcpt("kept@dest.test",
                            ["notify=delay,failure", "ORCPT=rfc822;Kept+2BOriginal@Dest.test"])
        assert code == 250
        code, msg = smtp.data(b"Subject: x\r\n\r\nx\r\n")
        assert code == 250, msg
    engine.wait_status("kept@dest.test", "deferred")
    [queued] = engine.queue()
    assert (queued["ret"], queued["envid"]) == ("HDRS", "Mixed+Case-1")
    [rcpt] = queued["recipients"]
    assert (rcpt["notify"], rcpt["orcpt"]) == ("FAILURE,DELAY", "rfc822;Kept+Original@Dest.test")
    shown = engine.cli("queue", "-c", str(engine.config), "show", queued["queue_id"]).stdout
    assert "RET=HDRS ENVID=Mixed+Case-1" in shown
    assert "notify: FAILURE,DELAY" in shown and "orcpt: rfc822;Kept+Original@Dest.test" in shown


# -- a next hop without DSN: our own notices ----------------------------------------------------


def test_notify_success_to_a_hop_without_dsn_yields_a_relayed_notice_that_is_no_failure(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    sink = smtp_sink("127.0.0.1", port)
    engine = engine_to(engine_factory, port)
    submit(engine, ["ENVID=env-relayed-1"],
           [("bob@dest.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob.Orig@dest.test"]),
            ("quiet@dest.test", [])])
    assert sink.wait_for(2, timeout=30), engine.log_text()
    original = next(m for m in sink.messages if m.mail_from == SENDER)
    assert set(original.rcpt_tos) == {"bob@dest.test", "quiet@dest.test"}
    assert not any("RET=" in o or "ENVID=" in o for o in original.mail_options)
    [notice] = notices(sink)
    assert notice.rcpt_tos == (SENDER,)
    per_message, blocks = report_fields(notice.data)
    assert per_message["Original-Envelope-Id"] == "env-relayed-1"
    [block] = blocks  # quiet@ asked for nothing: no success notice for it
    assert block["Action"] == "relayed"
    assert block["Final-Recipient"] == "rfc822; bob@dest.test"
    assert block["Original-Recipient"] == "rfc822; Bob.Orig@dest.test"
    assert block["Status"].startswith("2.")
    assert all_failures(email.message_from_bytes(notice.data)) == (frozenset(), frozenset())
    assert "sender delivery status notification" in engine.log_text()
    engine.stop()
    samples = textfile_samples(engine)
    assert samples[("deliverd_dsn_sent_total", (("kind", "relayed"),))] == 1
    assert samples[("deliverd_dsn_sent_total", (("kind", "failure"),))] == 0


def test_an_alias_keeps_the_address_the_client_used_as_original_recipient(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    sink = smtp_sink("127.0.0.1", port)
    engine = engine_to(engine_factory, port, local={"aliases": {"root": ["ops@dest.test"]}})
    submit(engine, [], [("root@localhost", ["NOTIFY=SUCCESS"])])
    assert sink.wait_for(2, timeout=30), engine.log_text()
    [notice] = notices(sink)
    _, [block] = report_fields(notice.data)
    assert block["Final-Recipient"] == "rfc822; ops@dest.test"
    assert block["Original-Recipient"] == "rfc822; root@localhost"


def test_notify_never_on_a_bounced_recipient_yields_no_notice_for_it(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    refused = "550 5.1.1 no such user"
    sink = smtp_sink("127.0.0.1", port, rcpt={"never@dest.test": refused,
                                              "told@dest.test": refused})
    engine = engine_to(engine_factory, port)
    submit(engine, [], [("never@dest.test", ["NOTIFY=NEVER"]), ("told@dest.test", [])])
    assert sink.wait_for(1, timeout=30), engine.log_text()
    engine.wait_status("never@dest.test", "bounced")
    [notice] = notices(sink)
    _, blocks = report_fields(notice.data)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; told@dest.test"]
    text = email.message_from_bytes(notice.data).get_payload()[0]  # type: ignore[index]
    assert "<told@dest.test>" in text.get_payload(decode=True).decode()
    assert "<never@dest.test>" not in text.get_payload(decode=True).decode()
    assert all_failures(email.message_from_bytes(notice.data))[1] == frozenset({b"told@dest.test"})
    assert "to=<never@dest.test>: no failure notice" in engine.log_text()


@pytest.mark.parametrize(("ret", "returned_type", "body_returned"), [
    (None, "text/rfc822-headers", False),  # as before RFC 3461 support: headers
    ("HDRS", "text/rfc822-headers", False),
    ("FULL", "message/rfc822", True),
])
def test_ret_decides_whether_a_failure_notice_returns_the_body(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
    ret: str | None, returned_type: str, body_returned: bool,
) -> None:
    port = free_port()
    sink = smtp_sink("127.0.0.1", port, rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    engine = engine_to(engine_factory, port)
    submit(engine, [f"RET={ret}"] if ret else [], [("gone@dest.test", [])])
    assert sink.wait_for(1, timeout=30), engine.log_text()
    [notice] = notices(sink)
    msg = email.message_from_bytes(notice.data)
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    assert parts[2].get_content_type() == returned_type
    assert (MARKER.encode() in notice.data) is body_returned
    assert b"Subject: dsn test" in notice.data


def test_ret_full_of_a_message_stored_in_chunks_returns_its_first_mebibyte_and_says_so(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    sink = smtp_sink("127.0.0.1", port, rcpt={"gone@dest.test": "550 5.1.1 no such user"})
    engine = engine_to(engine_factory, port)
    line = "x" * 98 + "\r\n"
    body = BODY + line * (3 * 1024 * 1024 // len(line)) + "the-last-line\r\n"
    submit(engine, ["RET=FULL"], [("gone@dest.test", [])], body=body)
    assert sink.wait_for(1, timeout=60), engine.log_text()
    [notice] = notices(sink)
    msg = email.message_from_bytes(notice.data)
    text, _, returned = msg.get_payload()  # type: ignore[misc]
    assert returned.get_content_type() == "message/rfc822"
    assert "only its first" in text.get_payload(decode=True).decode()
    assert MARKER.encode() in notice.data and b"the-last-line" not in notice.data
    assert RETURN_FULL_LIMIT - len(line) < len(notice.data) - len(text.as_bytes()) < (
        RETURN_FULL_LIMIT + 64 * 1024)


def test_notify_without_delay_gets_no_delay_notice(
    smtp_sink: Callable[..., Sink], engine_factory: Callable[..., Engine],
) -> None:
    port = free_port()
    later = "451 4.3.0 try later"
    sink = smtp_sink("127.0.0.1", port, rcpt={"wait@dest.test": later,
                                              "nodelay@dest.test": later})
    engine = engine_to(engine_factory, port,
                       dsn={"notify_delayed": True, "include_transcript": False})
    submit(engine, [], [("nodelay@dest.test", ["NOTIFY=FAILURE"]),
                        ("wait@dest.test", ["NOTIFY=DELAY,FAILURE"])])
    assert sink.wait_for(1, timeout=30), engine.log_text()
    [notice] = notices(sink)
    _, blocks = report_fields(notice.data)
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks] == [
        ("rfc822; wait@dest.test", "delayed")]


# -- a real Postfix next hop, which offers DSN ------------------------------------------------


@pytest.fixture
def postfix_relay(lab_dir: Path, smtp_sink: Callable[..., Sink]) -> Iterator[PostfixRelay]:
    """Postfix relaying everything to an aiosmtpd sink (its own notices included)."""
    _require("postfix")
    sink = smtp_sink("127.0.0.1", 0)
    postfix = PostfixRelay(lab_dir / "postfix", port=free_port(),
                           relayhost=f"[127.0.0.1]:{sink.port}", hostname="relay.test",
                           require_auth=False)
    postfix.sink = sink  # type: ignore[attr-defined]
    try:
        postfix.start()
        yield postfix
    finally:
        postfix.stop()


def test_notify_orcpt_and_envid_reach_a_postfix_next_hop(
    postfix_relay: PostfixRelay, engine_factory: Callable[..., Engine],
) -> None:
    sink: Sink = postfix_relay.sink  # type: ignore[attr-defined]
    engine = engine_to(engine_factory, postfix_relay.port)
    qid = submit(engine, ["RET=HDRS", "ENVID=env+2Bpostfix-7"],
                 [("bob@dest.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob.Orig@dest.test"])])
    engine.wait_status("bob@dest.test", "sent", timeout=30)
    # Postfix relays to the sink, which offers no DSN: Postfix itself then reports "relayed"
    # to our sender, quoting what it received from us.
    assert sink.wait_for(2, timeout=60), postfix_relay.log_text() + engine.log_text()
    [notice] = notices(sink)
    assert notice.rcpt_tos == (SENDER,)
    per_message, [block] = report_fields(notice.data)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "env+postfix-7"
    assert block["Action"] == "relayed"
    assert block["Original-Recipient"].replace(" ", "") == "rfc822;Bob.Orig@dest.test"
    assert block["Final-Recipient"].replace(" ", "") == "rfc822;bob@dest.test"
    # The hop took NOTIFY=SUCCESS and owns the notice: none from us.
    engine.wait_for(lambda: not engine.queue(), what="empty queue")
    assert not any(r.get("queue_id") == qid and "notification" in r.get("message", "")
                   for r in engine.log_records()), engine.log_text()


# -- sendmail -N -R -V ---------------------------------------------------------------------------


def test_sendmail_dsn_flags_reach_the_queue_through_the_maildrop(
    mta_host: type[MtaHost],
) -> None:
    host = mta_host(rcpt={"later@example.org": "451 4.3.0 try later"})
    host.make_maildrop()  # as a daemon that ran once left it; it is down now
    user = host.users[0]
    result = host.run(user, "-N", "never", "-R", "full", "-V", "env-sendmail-1",
                      "later@example.org", stdin=b"Subject: cron\n\nout\n")
    assert result.returncode == 0, result.stderr
    host.engine.start()
    host.engine.wait_status("later@example.org", "deferred")
    [queued] = host.engine.queue()
    assert (queued["ret"], queued["envid"]) == ("FULL", "env-sendmail-1")
    assert [r["notify"] for r in queued["recipients"]] == ["NEVER"]


def test_sendmail_refuses_a_bad_envelope_id(mta_host: type[MtaHost]) -> None:
    host = mta_host()
    result = host.run(host.users[0], "-V", "tab\tinside", "x@example.org", stdin=b"x\n")
    assert result.returncode == 64
    assert b"-V: ENVID must be printable US-ASCII, at most 100" in result.stderr
