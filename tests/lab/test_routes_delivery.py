"""routes[] end to end: one message, three recipients, three routes.

A recipient-domain route delivers direct to the partner's MX, a sender-domain route goes
through a second real Postfix with its own SASL credentials, and the rest goes through the
default smart host, the first real Postfix, with the global credentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from deliverd_lab import PostfixRelay
from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine
from tests.fixtures.mailservers import SmarthostLab
from tests.fixtures.smtp_sink import Sink, TlsCA, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTNER_MX = "127.0.0.51"


@pytest.fixture
def second_postfix(postfix_smarthost: SmarthostLab, lab_dir: Path, tls_ca: TlsCA,
                   smtp_sink: Callable[..., Sink]) -> Iterator[tuple[PostfixRelay, Sink]]:
    """Another SASL smart host (same Dovecot users), relaying to its own sink."""
    sink = smtp_sink("127.0.0.1", 0)
    chain = lab_dir / "relay2-chain.pem"
    tls_ca.server_cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    postfix = PostfixRelay(
        lab_dir / "postfix2",
        port=free_port(),
        relayhost=f"[127.0.0.1]:{sink.port}",
        hostname="relay2.test",
        sasl_socket=postfix_smarthost.dovecot.auth_socket,
        tls_chain_file=chain,
        require_auth=True,
    )
    try:
        postfix.start()
        yield postfix, sink
    finally:
        postfix.stop()


def wait_for(read: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.fixture
def nameserver(dns_server_factory: Callable[[Sequence[str]], DnsServer]) -> str:
    return dns_server_factory([
        "host-record=relay.test,127.0.0.1",
        "mx-host=partner.test,mx.partner.test,10",
        f"host-record=mx.partner.test,{PARTNER_MX}",
    ]).nameserver


def test_one_message_is_split_over_a_recipient_route_a_sender_route_and_the_default(
    postfix_smarthost: SmarthostLab, second_postfix: tuple[PostfixRelay, Sink],
    nameserver: str, engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    default, (billing_relay, billing_sink) = postfix_smarthost, second_postfix
    partner_port = free_port((PARTNER_MX,))
    partner = smtp_sink(PARTNER_MX, partner_port)
    tls = {"tls": "starttls", "ca_file": default.ca_file}
    engine = engine_factory({
        "routing": {
            "mode": "smarthost",
            "direct": {"port": partner_port},
            "smarthost": {"host": "relay.test", "port": default.port, **tls,
                          "auth": {"username": "relay", "password": default.users["relay"]}},
        },
        "routes": [
            {"name": "partner", "match": {"recipient_domain": ["partner.test"]},
             "mode": "direct"},
            {"name": "billing",
             "match": {"sender_domain": ["billing.test"], "recipient_domain": ["customers.test"]},
             "smarthost": {"host": "relay.test", "port": billing_relay.port, **tls,
                           "auth": {"username": "alice", "password": default.users["alice"]}}},
        ],
        "dsn": {"notify_delayed": False},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }, nameserver=nameserver)

    engine.submit("invoices@billing.test",
                  ["p@partner.test", "c@customers.test", "o@elsewhere.test"])

    to_partner = engine.wait_status("p@partner.test", "sent", timeout=30)
    to_customer = engine.wait_status("c@customers.test", "sent", timeout=30)
    to_other = engine.wait_status("o@elsewhere.test", "sent", timeout=30)
    assert to_partner["relay"] == f"mx.partner.test[{PARTNER_MX}]:{partner_port}"
    assert to_partner["route"] == "direct" and to_partner["route_name"] == "partner"
    assert to_customer["relay"] == f"relay.test[127.0.0.1]:{billing_relay.port}"
    assert to_customer["route_name"] == "billing"
    assert to_other["relay"] == f"relay.test[127.0.0.1]:{default.port}"
    assert "route_name" not in to_other

    assert partner.wait_for(1) and default.sink.wait_for(1) and billing_sink.wait_for(1)
    assert partner.messages[0].rcpt_tos == ("p@partner.test",)
    assert billing_sink.messages[0].rcpt_tos == ("c@customers.test",)
    assert default.sink.messages[0].rcpt_tos == ("o@elsewhere.test",)
    # Each smart host saw its own login: the route's credentials, and the global ones.
    assert wait_for(billing_relay.sasl_users) == ["alice"]
    assert wait_for(default.postfix.sasl_users) == ["relay"]
    log = engine.log_text()
    assert default.users["alice"] not in log and default.users["relay"] not in log
    # Named routes are counted by name on the Prometheus endpoint.
    scraped = engine.scrape()
    assert 'deliverd_route_recipients_total{route_name="billing",status="sent"} 1.0' in scraped
    assert 'deliverd_route_recipients_total{route_name="partner",status="sent"} 1.0' in scraped
    assert 'route_name=""' not in scraped
