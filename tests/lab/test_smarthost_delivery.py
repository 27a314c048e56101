"""docs/delivery.md, smarthost and direct_then_smarthost, end to end against aiosmtpd doubles.

The real Postfix + Dovecot smart host is proven in test_smarthost_postfix.py and
test_pop_before_smtp.py; here scripted doubles prove every branch of the rules.
"""

from __future__ import annotations

import email
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine, deep_merge
from tests.fixtures.smtp_sink import Sink, free_port

pytestmark = pytest.mark.integration

SENDER = "alice@sender.test"
SENDER_MX = "127.0.0.20"
RELAY = "127.0.0.30"
LOOP_ADDRESS = "127.0.0.99"
PASSWORD = "pw-Zq7-global-secret"
ACCOUNT_PASSWORD = "pw-Kx3-account-secret"

ZONE = (
    "mx-host=sender.test,mx.sender.test,10",
    f"host-record=mx.sender.test,{SENDER_MX}",
    "mx-host=direct.test,mx.direct.test,10",
    "host-record=mx.direct.test,127.0.0.11",
    "mx-host=nullmx.test,.,0",
    f"host-record=relay.test,{RELAY}",
    "mx-host=relays.test,r2.relays.test,20",
    "mx-host=relays.test,r1.relays.test,10",
    "host-record=r1.relays.test,127.0.0.31",
    "host-record=r2.relays.test,127.0.0.32",
    f"host-record=loop.test,{LOOP_ADDRESS}",
)
ADDRESSES = ("127.0.0.11", SENDER_MX, RELAY, "127.0.0.31", "127.0.0.32")


@pytest.fixture(scope="module")
def zone(session_dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    return session_dns_server_factory(ZONE)


@pytest.fixture(scope="module")
def port() -> int:
    """One port for every double: MX hosts and smart hosts alike."""
    return free_port(ADDRESSES)


@pytest.fixture
def sender_mx(smtp_sink: Callable[..., Sink], port: int) -> Sink:
    return smtp_sink(SENDER_MX, port)


@pytest.fixture
def start(engine_factory: Callable[..., Engine], zone: DnsServer, port: int,
          sender_mx: Sink) -> Callable[..., Engine]:
    def make(mode: str = "smarthost", smarthost: dict[str, Any] | None = None,
             **extra: Any) -> Engine:
        spec = {
            "host": {"addresses": [LOOP_ADDRESS]},
            "routing": {"mode": mode, "direct": {"port": port},
                        "smarthost": {"host": "relay.test", "port": port, "tls": "none",
                                      **(smarthost or {})}},
            "dsn": {"notify_delayed": False},
        }
        return engine_factory(deep_merge(spec, extra), nameserver=zone.nameserver)
    return make


def dsn_status(sink: Sink) -> list[str]:
    statuses = []
    for message in sink.messages:
        if message.mail_from in ("", "<>"):
            report = email.message_from_bytes(message.data)
            for part in report.walk():
                if part.get_content_type() == "message/delivery-status":
                    statuses += [b["Status"] for b in part.get_payload()[1:]]
    return statuses


# --- smarthost mode ---------------------------------------------------------------------------

def test_smarthost_mode_sends_every_domain_to_the_smart_host(start: Callable[..., Engine],
                                                             smtp_sink: Callable[..., Sink],
                                                             port: int) -> None:
    relay = smtp_sink(RELAY, port)
    mx = smtp_sink("127.0.0.11", port)
    engine = start()
    engine.submit(SENDER, ["bob@direct.test", "carol@elsewhere.test"])
    record = engine.wait_status("bob@direct.test", "sent")
    engine.wait_status("carol@elsewhere.test", "sent")
    assert record["route"] == "smarthost"
    assert record["relay"] == f"relay.test[{RELAY}]:{port}"
    assert relay.messages[0].rcpt_tos == ("bob@direct.test", "carol@elsewhere.test")
    assert not mx.messages


def test_resolve_mx_delivers_to_the_smart_host_domains_mx_in_preference_order(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int) -> None:
    r1 = smtp_sink("127.0.0.31", port, greeting="421 4.3.2 busy")
    r2 = smtp_sink("127.0.0.32", port)
    engine = start(smarthost={"host": "relays.test", "resolve_mx": True})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    record = engine.wait_status("bob@elsewhere.test", "sent")
    assert "r2.relays.test" in record["relay"]
    assert r1.sessions and len(r2.messages) == 1


@pytest.mark.parametrize(("reply", "bounce_on_5xx", "status"), [
    ("451 4.3.0 try later", False, "deferred"),
    ("451 4.3.0 try later", True, "deferred"),
    ("554 5.7.1 relay denied", False, "deferred"),
    ("554 5.7.1 relay denied", True, "bounced"),
])
def test_smart_host_replies_follow_bounce_on_5xx(start: Callable[..., Engine],
                                                 smtp_sink: Callable[..., Sink], port: int,
                                                 reply: str,
                                                 bounce_on_5xx: bool, status: str) -> None:
    relay = smtp_sink(RELAY, port, rcpt={"bob@elsewhere.test": reply})
    engine = start(smarthost={"bounce_on_5xx": bounce_on_5xx})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", status)
    if status == "bounced":
        # in smarthost mode the bounce itself leaves through the smart host too
        assert relay.wait_for(1, timeout=15)
        assert dsn_status(relay) == [reply.split()[1]]
        assert relay.messages[0].rcpt_tos == (SENDER,)
    else:
        (entry,) = engine.queue()
        assert entry["recipients"][0]["state"] == "deferred"


def test_unreachable_smart_host_defers(start: Callable[..., Engine]) -> None:
    engine = start()  # nothing listens on the relay address
    engine.submit(SENDER, ["bob@elsewhere.test"])
    record = engine.wait_status("bob@elsewhere.test", "deferred")
    assert record["dsn"].startswith("4.")


def test_starttls_required_but_not_offered_defers_before_any_mail(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int) -> None:
    relay = smtp_sink(RELAY, port)  # no STARTTLS
    engine = start(smarthost={"tls": "starttls"})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "deferred")
    commands = [c for s in relay.sessions for c in s.commands]
    assert not any(c.startswith(("MAIL", "AUTH")) for c in commands)


def test_untrusted_certificate_defers_and_ca_file_fixes_it(start: Callable[..., Engine],
                                                           smtp_sink: Callable[..., Sink],
                                                           port: int, ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, starttls=True)
    engine = start(smarthost={"tls": "starttls"})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    record = engine.wait_status("bob@elsewhere.test", "deferred")
    assert "certificate" in record["reply"].lower()
    assert not relay.messages

    trusted = start(smarthost={"tls": "starttls", "ca_file": ca_file})
    trusted.submit(SENDER, ["carol@elsewhere.test"])
    trusted.wait_status("carol@elsewhere.test", "sent")
    assert relay.messages[0].tls is True


def test_implicit_tls_smart_host(start: Callable[..., Engine], smtp_sink: Callable[..., Sink],
                                 port: int, ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, implicit_tls=True)
    engine = start(smarthost={"tls": "tls", "ca_file": ca_file})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "sent")
    assert relay.messages[0].tls is True


def test_auth_over_starttls_logs_in_with_the_global_credentials(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, starttls=True, auth={"relay": PASSWORD}, require_auth=True)
    engine = start(smarthost={"tls": "starttls", "ca_file": ca_file,
                              "auth": {"username": "relay", "password": PASSWORD}})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "sent")
    assert relay.messages[0].user == "relay" and relay.messages[0].tls


def test_wrong_password_defers_and_never_bounces(start: Callable[..., Engine],
                                                 smtp_sink: Callable[..., Sink], port: int,
                                                 sender_mx: Sink, ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, starttls=True, auth={"relay": "another"}, require_auth=True)
    engine = start(smarthost={"tls": "starttls", "ca_file": ca_file, "bounce_on_5xx": True,
                              "auth": {"username": "relay", "password": PASSWORD}})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    record = engine.wait_status("bob@elsewhere.test", "deferred")
    assert record["dsn"].startswith("4.7")
    assert "535" in record["reply"]
    assert not relay.messages and not sender_mx.messages
    assert PASSWORD not in engine.log_text()
    # loudly (an error naming the smart host) and counted (the metrics textfile)
    errors = [r for r in engine.log_records() if r.get("level") == "error"]
    assert any("smart host AUTH failed" in r["message"] for r in errors), errors
    engine.stop()
    text = (engine.workdir / "queue" / "deliverd.prom").read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("deliverd_smarthost_failures_total", (("stage", "auth"),))] >= 1
    assert samples[("deliverd_delivery_attempts_total", (("result", "deferred"),))] >= 1
    assert samples[("deliverd_deferred_attempts_total", (("status_class", "4.7"),))] >= 1


def test_plaintext_auth_only_when_allowed(start: Callable[..., Engine],
                                          smtp_sink: Callable[..., Sink], port: int) -> None:
    relay = smtp_sink(RELAY, port, auth={"relay": PASSWORD}, auth_require_tls=False,
                      require_auth=True)
    engine = start(smarthost={"tls": "none", "allow_plaintext_auth": True,
                              "auth": {"username": "relay", "password": PASSWORD}})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "sent")
    assert relay.messages[0].user == "relay" and not relay.messages[0].tls


def test_per_account_credentials_and_sessions_keyed_by_identity(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, starttls=True, require_auth=True,
                      auth={"relay": PASSWORD, "alice-login": ACCOUNT_PASSWORD})
    engine = start(
        smarthost={"tls": "starttls", "ca_file": ca_file, "per_account_auth": True,
                   "auth": {"username": "relay", "password": PASSWORD}},
        accounts=[{"address": SENDER,
                   "smarthost_auth": {"username": "alice-login",
                                      "password": ACCOUNT_PASSWORD}}],
    )
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.submit("zed@sender.test", ["carol@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "sent")
    engine.wait_status("carol@elsewhere.test", "sent")
    users = {m.rcpt_tos[0]: m.user for m in relay.messages}
    assert users == {"bob@elsewhere.test": "alice-login", "carol@elsewhere.test": "relay"}
    assert {s.user for s in relay.sessions if s.user} == {"relay", "alice-login"}


def test_smart_host_that_is_us_is_held_as_a_loop(start: Callable[..., Engine]) -> None:
    engine = start(smarthost={"host": "loop.test"})
    engine.submit(SENDER, ["bob@elsewhere.test"])
    record = engine.wait_status("bob@elsewhere.test", "held")
    assert "loop" in record["reply"]


def test_smart_host_greeting_with_our_name_is_held_as_a_loop(start: Callable[..., Engine],
                                                             smtp_sink: Callable[..., Sink],
                                                             port: int) -> None:
    smtp_sink(RELAY, port, greeting="220 deliverd.test ESMTP")
    engine = start()
    engine.submit(SENDER, ["bob@elsewhere.test"])
    engine.wait_status("bob@elsewhere.test", "held")


def test_abort_on_rcpt_5xx_with_the_smart_host(start: Callable[..., Engine],
                                               smtp_sink: Callable[..., Sink], port: int) -> None:
    relay = smtp_sink(RELAY, port, rcpt={"bad@elsewhere.test": "550 5.1.1 unknown"})
    engine = start(smarthost={"bounce_on_5xx": True}, routing={"abort_on_rcpt_5xx": True})
    engine.submit(SENDER, ["bad@elsewhere.test", "good@elsewhere.test"])
    engine.wait_status("bad@elsewhere.test", "bounced")
    engine.wait_status("good@elsewhere.test", "deferred")
    engine.wait_status("good@elsewhere.test", "sent", timeout=30)
    assert [m.rcpt_tos for m in relay.messages if m.mail_from == SENDER] == [
        ("good@elsewhere.test",)
    ]
    assert dsn_status(relay) == ["5.1.1"]


# --- direct_then_smarthost --------------------------------------------------------------------

@pytest.mark.parametrize(("recipient", "mx_script"), [
    ("bob@nxdomain.test", None),  # unresolvable destination
    ("bob@direct.test", None),  # MX refuses the connection (nothing listens)
    ("bob@direct.test", {"stall": {"greeting": 30}}),  # timeout
    ("bob@direct.test", {"rcpt": {"bob@direct.test": "451 4.2.1 busy"}}),  # 4xx
])
def test_fallback_hands_direct_failures_to_the_smart_host(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        recipient: str, mx_script: dict[str, Any] | None) -> None:
    if mx_script is not None:
        smtp_sink("127.0.0.11", port, **mx_script)
    relay = smtp_sink(RELAY, port)
    engine = start("direct_then_smarthost", timeouts={"greeting": "1s"})
    engine.submit(SENDER, [recipient])
    record = engine.wait_status(recipient, "sent")
    assert record["route"] == "smarthost"
    assert relay.messages[0].rcpt_tos == (recipient,)


def test_fallback_takes_mx_5xx_to_the_smart_host_only_when_bounce_on_mx_5xx_is_off(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        sender_mx: Sink) -> None:
    smtp_sink("127.0.0.11", port, rcpt={"bob@direct.test": "550 5.7.1 blocked",
                                        "carol@direct.test": "550 5.7.1 blocked"})
    relay = smtp_sink(RELAY, port)
    strict = start("direct_then_smarthost")
    strict.submit(SENDER, ["bob@direct.test"])
    strict.wait_status("bob@direct.test", "bounced")
    lenient = start("direct_then_smarthost", routing={"direct": {"bounce_on_mx_5xx": False}})
    lenient.submit(SENDER, ["carol@direct.test"])
    record = lenient.wait_status("carol@direct.test", "sent")
    assert record["route"] == "smarthost"
    assert [m.rcpt_tos for m in relay.messages] == [("carol@direct.test",)]


def test_fallback_never_sends_null_mx_domains_to_the_smart_host(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int) -> None:
    relay = smtp_sink(RELAY, port)
    engine = start("direct_then_smarthost")
    engine.submit(SENDER, ["bob@nullmx.test"])
    engine.wait_status("bob@nullmx.test", "bounced")
    assert not relay.messages


def test_every_retry_starts_with_direct_again(start: Callable[..., Engine],
                                              smtp_sink: Callable[..., Sink], port: int) -> None:
    mx = smtp_sink("127.0.0.11", port, greeting="421 4.3.2 busy")
    relay = smtp_sink(RELAY, port, greeting="421 4.3.2 busy too")
    engine = start("direct_then_smarthost")
    engine.submit(SENDER, ["bob@direct.test"])
    engine.wait_status("bob@direct.test", "deferred")
    assert mx.sessions and relay.sessions
    mx.stop()
    healthy_mx = smtp_sink("127.0.0.11", port)
    record = engine.wait_status("bob@direct.test", "sent", timeout=30)
    assert record["route"] == "direct"
    assert len(healthy_mx.messages) == 1


# --- secrets ----------------------------------------------------------------------------------

def test_passwords_appear_in_no_log_dsn_queue_listing_process_title_or_probe(
        start: Callable[..., Engine], smtp_sink: Callable[..., Sink], port: int,
        ca_file: str) -> None:
    relay = smtp_sink(RELAY, port, starttls=True, auth={"relay": PASSWORD}, require_auth=True,
                      rcpt={"bad@elsewhere.test": "554 5.7.1 refused"})
    engine = start(smarthost={"tls": "starttls", "ca_file": ca_file, "bounce_on_5xx": True,
                              "auth": {"username": "relay", "password": PASSWORD}},
                   dsn={"notify_delayed": True, "include_transcript": True})

    engine.submit(SENDER, ["bad@elsewhere.test", "good@elsewhere.test"])
    engine.wait_status("bad@elsewhere.test", "bounced")
    assert relay.wait_for(2, timeout=15)  # the good recipient's copy and the bounce
    assert engine.proc is not None
    cmdline = Path(f"/proc/{engine.proc.pid}/cmdline").read_bytes()
    probe = engine.cli("probe", "-c", str(engine.config), "--json", check=False)
    listing = engine.cli("queue", "-c", str(engine.config), "list", "--json")
    config_text = engine.config.read_text()
    haystacks = {
        "log": engine.log_text(),
        "dsn": b"".join(m.data for m in relay.messages).decode(errors="replace"),
        "queue": listing.stdout + listing.stderr,
        "cmdline": cmdline.decode(errors="replace"),
        "probe": probe.stdout + probe.stderr,
        "config": config_text,
    }
    assert probe.returncode == 0, probe.stdout + probe.stderr
    for name, text in haystacks.items():
        assert PASSWORD not in text, f"password leaked into the {name}"
    # the AUTH exchange itself is redacted in the transcript, not just the plain password
    import base64
    encoded = base64.b64encode(f"\0relay\0{PASSWORD}".encode()).decode()
    assert encoded not in haystacks["dsn"] and encoded not in haystacks["log"]
