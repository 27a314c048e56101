"""docs/delivery.md, direct mode, end to end: real listener, real dnsmasq, real aiosmtpd MX sinks.

Every test submits mail over SMTP to a running ``deliverd run`` and asserts what the sinks
received, the queue state, the log line and the DSN that came back to the sender's own MX.
"""

from __future__ import annotations

import email
from collections.abc import Callable
from email.message import Message
from typing import Any

import pytest

from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine, deep_merge
from tests.fixtures.smtp_sink import S250_QUEUED, Sink, free_port

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
SENDER_MX = "127.0.0.20"
LOOP_ADDRESS = "127.0.0.99"

ZONE = (
    "mx-host=sender.test,mx.sender.test,10",
    f"host-record=mx.sender.test,{SENDER_MX}",
    # two MX hosts in a fixed order
    "mx-host=two.test,mx1.two.test,10",
    "mx-host=two.test,mx2.two.test,20",
    "host-record=mx1.two.test,127.0.0.11",
    "host-record=mx2.two.test,127.0.0.12",
    # equal preferences: shuffled
    "mx-host=equal.test,a.equal.test,10",
    "mx-host=equal.test,b.equal.test,10",
    "host-record=a.equal.test,127.0.0.15",
    "host-record=b.equal.test,127.0.0.16",
    # one MX host with two addresses
    "mx-host=multi.test,mx.multi.test,10",
    "host-record=mx.multi.test,127.0.0.21",
    "host-record=mx.multi.test,127.0.0.22",
    # no MX: implicit MX from the A record
    "host-record=nomx.test,127.0.0.14",
    # RFC 7505 null MX
    "mx-host=nullmx.test,.,0",
    # an MX that resolves to this host's own address
    "mx-host=loop.test,mx.loop.test,10",
    f"host-record=mx.loop.test,{LOOP_ADDRESS}",
)
SINK_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.14", "127.0.0.15", "127.0.0.16",
                  "127.0.0.20", "127.0.0.21", "127.0.0.22")


@pytest.fixture(scope="module")
def zone(session_dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    return session_dns_server_factory(ZONE)


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port(SINK_ADDRESSES)


@pytest.fixture
def sender_mx(smtp_sink: Callable[..., Sink], mx_port: int) -> Sink:
    """The sender's own MX: DSNs land here."""
    return smtp_sink(SENDER_MX, mx_port)


@pytest.fixture
def start(engine_factory: Callable[..., Engine], zone: DnsServer, mx_port: int,
          sender_mx: Sink) -> Callable[..., Engine]:
    def make(extra: dict[str, Any] | None = None) -> Engine:
        base = {"host": {"addresses": [LOOP_ADDRESS]}, "routing": {"direct": {"port": mx_port}}}
        return engine_factory(deep_merge(base, extra or {}), nameserver=zone.nameserver)
    return make


def dsn_reports(sink: Sink) -> list[Message]:
    return [email.message_from_bytes(m.data) for m in sink.messages if m.mail_from in ("", "<>")]


def delivery_status(report: Message) -> list[dict[str, str]]:
    """Per-recipient fields of the message/delivery-status part."""
    for part in report.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            return [dict(block.items()) for block in blocks[1:]]
    raise AssertionError("no message/delivery-status part")


def wait_dsn(sink: Sink, count: int = 1, timeout: float = 20.0) -> list[Message]:
    assert sink.wait_for(count, timeout=timeout), "no DSN reached the sender's MX"
    return dsn_reports(sink)


# --- MX selection -----------------------------------------------------------------------------

def test_delivers_to_lowest_preference_mx_with_all_recipients_in_one_transaction(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], mx_port: int) -> None:
    mx1, mx2 = smtp_sink("127.0.0.11", mx_port), smtp_sink("127.0.0.12", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@two.test", "carol@two.test"])
    record = engine.wait_status("bob@two.test", "sent")
    assert mx1.wait_for(1)
    assert mx1.messages[0].rcpt_tos == ("bob@two.test", "carol@two.test")
    assert len(mx1.messages) == 1 and not mx2.messages
    assert record["relay"] == f"mx1.two.test[127.0.0.11]:{mx_port}"
    assert record["dsn"] == "2.0.0"
    assert b"Received: from client.test" in mx1.messages[0].data


def test_connect_failure_moves_to_next_mx(start: Callable[..., Engine],
                                          smtp_sink: Callable[..., Sink], mx_port: int) -> None:
    mx2 = smtp_sink("127.0.0.12", mx_port)  # nothing listens on mx1
    engine = start()
    engine.submit(SENDER, ["bob@two.test"])
    engine.wait_status("bob@two.test", "sent")
    assert mx2.messages[0].rcpt_tos == ("bob@two.test",)


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.3.2 no service"])
def test_refusing_greeting_is_that_hosts_failure(start: Callable[..., Engine],
                                                 smtp_sink: Callable[..., Sink], mx_port: int,
                                                 greeting: str) -> None:
    smtp_sink("127.0.0.11", mx_port, greeting=greeting)
    mx2 = smtp_sink("127.0.0.12", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@two.test"])
    engine.wait_status("bob@two.test", "sent")
    assert len(mx2.messages) == 1


def test_stalled_mx_times_out_and_next_mx_delivers(start: Callable[..., Engine],
                                                   smtp_sink: Callable[..., Sink],
                                                   mx_port: int) -> None:
    smtp_sink("127.0.0.11", mx_port, stall={"greeting": 30})
    mx2 = smtp_sink("127.0.0.12", mx_port)
    engine = start({"timeouts": {"greeting": "1s"}})
    engine.submit(SENDER, ["bob@two.test"])
    engine.wait_status("bob@two.test", "sent")
    assert len(mx2.messages) == 1


def test_every_address_of_an_mx_is_tried(start: Callable[..., Engine],
                                         smtp_sink: Callable[..., Sink], mx_port: int) -> None:
    smtp_sink("127.0.0.21", mx_port, greeting="421 4.3.2 busy")
    second = smtp_sink("127.0.0.22", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@multi.test"])
    record = engine.wait_status("bob@multi.test", "sent")
    assert len(second.messages) == 1
    assert "127.0.0.22" in record["relay"]


def test_equal_preference_mx_hosts_share_the_load(start: Callable[..., Engine],
                                                  smtp_sink: Callable[..., Sink],
                                                  mx_port: int) -> None:
    a = smtp_sink("127.0.0.15", mx_port)
    b = smtp_sink("127.0.0.16", mx_port)
    engine = start()
    for n in range(24):
        engine.submit(SENDER, [f"user{n}@equal.test"])
    engine.wait_for(lambda: len(a.messages) + len(b.messages) == 24, what="24 deliveries")
    assert a.messages and b.messages  # chance of all 24 on one host: 2**-23


def test_domain_without_mx_falls_back_to_its_address(start: Callable[..., Engine],
                                                     smtp_sink: Callable[..., Sink],
                                                     mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "sent")
    assert host.messages[0].rcpt_tos == ("bob@nomx.test",)


# --- bounces from DNS -------------------------------------------------------------------------

def test_domain_without_mx_bounces_when_bounce_on_no_mx(start: Callable[..., Engine],
                                                        smtp_sink: Callable[..., Sink],
                                                        sender_mx: Sink, mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port)
    engine = start({"routing": {"direct": {"bounce_on_no_mx": True}}})
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "bounced")
    (report,) = wait_dsn(sender_mx)
    assert delivery_status(report)[0]["Status"].startswith("5.")
    assert not host.messages


def test_nxdomain_bounces_with_5_1_2_and_an_rfc3464_report(start: Callable[..., Engine],
                                                           sender_mx: Sink) -> None:
    engine = start()
    engine.submit(SENDER, ["bob@nxdomain.test"], headers={"Subject": "original subject"})
    record = engine.wait_status("bob@nxdomain.test", "bounced")
    assert record["dsn"] == "5.1.2"
    (report,) = wait_dsn(sender_mx)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == SENDER
    fields = delivery_status(report)
    assert fields[0]["Final-Recipient"] == "rfc822; bob@nxdomain.test"
    assert fields[0]["Action"] == "failed"
    assert fields[0]["Status"] == "5.1.2"
    assert "original subject" in report.as_string()  # text/rfc822-headers of the original
    assert sender_mx.messages[0].rcpt_tos == (SENDER,)
    engine.wait_for(lambda: engine.queue() == [], what="bounced message removed from queue")


def test_null_mx_bounces_with_5_1_10(start: Callable[..., Engine], sender_mx: Sink) -> None:
    engine = start()
    engine.submit(SENDER, ["bob@nullmx.test"])
    record = engine.wait_status("bob@nullmx.test", "bounced")
    assert record["dsn"] == "5.1.10"
    (report,) = wait_dsn(sender_mx)
    assert delivery_status(report)[0]["Status"] == "5.1.10"


def test_dns_failure_defers(start: Callable[..., Engine], sender_mx: Sink) -> None:
    engine = start({"dsn": {"notify_delayed": False}})
    engine.submit(SENDER, ["bob@servfail.example"])
    record = engine.wait_status("bob@servfail.example", "deferred")
    assert record["dsn"].startswith("4.")
    (entry,) = engine.queue()
    assert entry["recipients"][0]["state"] == "deferred"
    assert not sender_mx.messages


# --- 5xx rules --------------------------------------------------------------------------------

def test_rcpt_5xx_bounces_at_once_when_bounce_on_mx_5xx(start: Callable[..., Engine],
                                                        smtp_sink: Callable[..., Sink],
                                                        sender_mx: Sink, mx_port: int) -> None:
    smtp_sink("127.0.0.11", mx_port, rcpt={"bob@two.test": "550 5.1.1 no such user"})
    mx2 = smtp_sink("127.0.0.12", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@two.test"])
    record = engine.wait_status("bob@two.test", "bounced")
    assert record["dsn"] == "5.1.1"
    (report,) = wait_dsn(sender_mx)
    fields = delivery_status(report)[0]
    assert fields["Remote-MTA"] == "dns; mx1.two.test"
    assert "550 5.1.1 no such user" in fields["Diagnostic-Code"]
    assert not mx2.messages  # never asked the second MX


def test_mx_5xx_tries_next_mx_when_bounce_on_mx_5xx_is_off(start: Callable[..., Engine],
                                                           smtp_sink: Callable[..., Sink],
                                                           mx_port: int) -> None:
    smtp_sink("127.0.0.11", mx_port, mail="550 5.7.1 not from you")
    mx2 = smtp_sink("127.0.0.12", mx_port)
    engine = start({"routing": {"direct": {"bounce_on_mx_5xx": False}}})
    engine.submit(SENDER, ["bob@two.test"])
    engine.wait_status("bob@two.test", "sent")
    assert len(mx2.messages) == 1


def test_mx_5xx_then_4xx_defers_when_bounce_on_mx_5xx_is_off(start: Callable[..., Engine],
                                                             smtp_sink: Callable[..., Sink],
                                                             mx_port: int) -> None:
    smtp_sink("127.0.0.11", mx_port, data="554 5.6.0 rejected")
    smtp_sink("127.0.0.12", mx_port, data="451 4.3.0 try again later")
    engine = start({"routing": {"direct": {"bounce_on_mx_5xx": False}}})
    engine.submit(SENDER, ["bob@two.test"])
    record = engine.wait_status("bob@two.test", "deferred")
    assert record["dsn"].startswith("4.")


def test_every_mx_5xx_bounces_when_bounce_on_mx_5xx_is_off(start: Callable[..., Engine],
                                                          smtp_sink: Callable[..., Sink],
                                                          sender_mx: Sink, mx_port: int) -> None:
    smtp_sink("127.0.0.11", mx_port, data="554 5.6.0 rejected")
    smtp_sink("127.0.0.12", mx_port, data="554 5.6.0 rejected here too")
    engine = start({"routing": {"direct": {"bounce_on_mx_5xx": False}}})
    engine.submit(SENDER, ["bob@two.test"])
    engine.wait_status("bob@two.test", "bounced")
    assert wait_dsn(sender_mx)


def test_rcpt_5xx_fails_only_that_recipient(start: Callable[..., Engine],
                                            smtp_sink: Callable[..., Sink], sender_mx: Sink,
                                            mx_port: int) -> None:
    mx1 = smtp_sink("127.0.0.11", mx_port, rcpt={"bad@two.test": "550 5.1.1 no such user"})
    engine = start()
    engine.submit(SENDER, ["bad@two.test", "good@two.test"])
    engine.wait_status("good@two.test", "sent")
    engine.wait_status("bad@two.test", "bounced")
    assert mx1.messages[0].rcpt_tos == ("good@two.test",)
    (report,) = wait_dsn(sender_mx)
    assert [f["Final-Recipient"] for f in delivery_status(report)] == ["rfc822; bad@two.test"]


def test_abort_on_rcpt_5xx_sends_no_data_and_defers_the_others(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], sender_mx: Sink,
        mx_port: int) -> None:
    mx1 = smtp_sink("127.0.0.11", mx_port, rcpt={"bad@two.test": "550 5.1.1 no such user"})
    engine = start({"routing": {"abort_on_rcpt_5xx": True}, "dsn": {"notify_delayed": False}})
    engine.submit(SENDER, ["bad@two.test", "good@two.test"])
    engine.wait_status("bad@two.test", "bounced")
    engine.wait_status("good@two.test", "deferred")
    first = mx1.sessions[0].commands
    assert any(c.startswith("RSET") for c in first) and not any(c == "DATA" for c in first)
    # the retry goes without the refused recipient and delivers the other one
    engine.wait_status("good@two.test", "sent", timeout=30)
    assert mx1.messages[0].rcpt_tos == ("good@two.test",)


# --- temporary failures, retry, delay notices -------------------------------------------------

def test_all_hosts_temporary_defers_sends_one_delay_notice_then_retry_delivers(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], sender_mx: Sink,
        mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port, rcpt={"bob@nomx.test": "451 4.3.0 try again later"})
    engine = start()
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "deferred")
    (notice,) = wait_dsn(sender_mx)
    fields = delivery_status(notice)[0]
    assert fields["Action"] == "delayed" and fields["Status"].startswith("4.")
    # a second deferral sends no second notice
    engine.wait_for(lambda: len(engine.attempts("bob@nomx.test")) >= 2, timeout=30,
                    what="a retry")
    assert len(dsn_reports(sender_mx)) == 1


def test_deferred_message_is_delivered_when_the_mx_recovers(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], mx_port: int) -> None:
    busy = smtp_sink("127.0.0.14", mx_port, greeting="421 4.3.2 busy")
    engine = start({"dsn": {"notify_delayed": False}})
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "deferred")
    busy.stop()
    healthy = smtp_sink("127.0.0.14", mx_port)
    engine.wait_status("bob@nomx.test", "sent", timeout=30)
    assert healthy.messages[0].rcpt_tos == ("bob@nomx.test",)
    engine.wait_for(lambda: engine.queue() == [], what="empty queue")


def test_expired_message_bounces(start: Callable[..., Engine], smtp_sink: Callable[..., Sink],
                                 sender_mx: Sink, mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port, greeting="421 4.3.2 busy")
    engine = start({"retry": {"expire_after": "3s"}, "dsn": {"notify_delayed": False}})
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "bounced", timeout=30)
    (report,) = wait_dsn(sender_mx)
    fields = delivery_status(report)[0]
    assert fields["Action"] == "failed"
    assert fields["Status"].startswith("4.")


def test_expired_message_is_held_with_on_expiry_hold(start: Callable[..., Engine],
                                                     smtp_sink: Callable[..., Sink],
                                                     sender_mx: Sink, mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port, greeting="421 4.3.2 busy")
    engine = start({"retry": {"expire_after": "3s", "on_expiry": "hold"},
                    "dsn": {"notify_delayed": False}})
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "held", timeout=30)
    (entry,) = engine.queue()
    assert entry["recipients"][0]["state"] == "held"
    assert not dsn_reports(sender_mx)


# --- loops and null senders -------------------------------------------------------------------

def test_mx_resolving_to_own_address_is_held_as_a_loop(start: Callable[..., Engine]) -> None:
    engine = start()
    engine.submit(SENDER, ["bob@loop.test"])
    record = engine.wait_status("bob@loop.test", "held")
    assert "loop" in record["reply"]
    (entry,) = engine.queue()
    assert entry["recipients"][0]["state"] == "held"


def test_mx_greeting_with_our_own_name_is_held_as_a_loop(start: Callable[..., Engine],
                                                         smtp_sink: Callable[..., Sink],
                                                         mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port, greeting="220 deliverd.test ESMTP")
    engine = start()
    engine.submit(SENDER, ["bob@nomx.test"])
    record = engine.wait_status("bob@nomx.test", "held")
    assert "loop" in record["reply"]


def test_bounce_of_a_null_sender_message_is_held_not_bounced(start: Callable[..., Engine],
                                                             sender_mx: Sink) -> None:
    engine = start()
    engine.submit("", ["bob@nxdomain.test"])
    engine.wait_status("bob@nxdomain.test", "bounced")
    engine.wait_for(lambda: engine.queue(), what="held entry")
    (entry,) = engine.queue()
    assert entry["recipients"][0]["state"] == "held"
    assert not sender_mx.messages


def test_mail_with_too_many_hops_is_held(start: Callable[..., Engine],
                                         smtp_sink: Callable[..., Sink], mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port)
    engine = start({"limits": {"max_hops": 3}})
    hops = "\r\n".join(f"Received: from hop{n}.test by hop{n + 1}.test" for n in range(4))
    engine.submit(SENDER, ["bob@nomx.test"], headers={"X-Trace": "x\r\n" + hops})
    entry = engine.wait_for(lambda: engine.queue(), what="queued entry")[0]
    assert entry["held"] is True
    assert not host.messages


def test_sink_reply_is_in_log_line(start: Callable[..., Engine], smtp_sink: Callable[..., Sink],
                                   mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@nomx.test"])
    record = engine.wait_status("bob@nomx.test", "sent")
    assert S250_QUEUED.split(" ", 1)[1] in record["reply"]
    assert record["route"] == "direct"


# --- 8BITMIME and SMTPUTF8 ---------------------------------------------------------------------

def test_8bit_message_is_passed_on_with_body_8bitmime(start: Callable[..., Engine],
                                                      smtp_sink: Callable[..., Sink],
                                                      mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port)
    engine = start()
    engine.submit(SENDER, ["bob@nomx.test"], body="Grüße aus Köln\n",
                  mail_options=("BODY=8BITMIME",))
    engine.wait_status("bob@nomx.test", "sent")
    assert "BODY=8BITMIME" in host.messages[0].mail_options
    assert "Grüße".encode() in host.messages[0].data


def test_smtputf8_message_goes_to_a_hop_that_offers_it(start: Callable[..., Engine],
                                                       smtp_sink: Callable[..., Sink],
                                                       mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port)
    engine = start()
    engine.submit("jörg@sender.test", ["bob@nomx.test"], mail_options=("SMTPUTF8",))
    engine.wait_status("bob@nomx.test", "sent")
    assert host.messages[0].mail_from == "jörg@sender.test"
    assert "SMTPUTF8" in host.messages[0].mail_options


def test_smtputf8_message_to_a_hop_without_it_bounces_5_6_7(start: Callable[..., Engine],
                                                            smtp_sink: Callable[..., Sink],
                                                            mx_port: int) -> None:
    host = smtp_sink("127.0.0.14", mx_port, smtputf8=False)
    engine = start()
    engine.submit(SENDER, ["björn@nomx.test"], mail_options=("SMTPUTF8",))
    record = engine.wait_status("björn@nomx.test", "bounced")
    assert record["dsn"] == "5.6.7"
    assert not host.messages


def test_expiry_dsn_is_copied_to_the_postmaster_when_asked(start: Callable[..., Engine],
                                                           smtp_sink: Callable[..., Sink],
                                                           sender_mx: Sink, mx_port: int) -> None:
    smtp_sink("127.0.0.14", mx_port, greeting="421 4.3.2 busy")
    engine = start({"retry": {"expire_after": "3s"},
                    "dsn": {"notify_delayed": False, "notify_postmaster": True,
                            "postmaster": "postmaster@sender.test"}})
    engine.submit(SENDER, ["bob@nomx.test"])
    engine.wait_status("bob@nomx.test", "bounced", timeout=30)
    assert sender_mx.wait_for(2, timeout=20)
    assert sorted(m.rcpt_tos for m in sender_mx.messages) == [
        (SENDER,), ("postmaster@sender.test",)]
    assert all(m.mail_from in ("", "<>") for m in sender_mx.messages)
