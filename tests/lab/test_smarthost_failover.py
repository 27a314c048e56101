"""routing.smarthost.hosts end to end: a failover list tried in order within one attempt.

The first host refuses connections, the second greets with 421, the third is a real Postfix
with Dovecot SASL over verified STARTTLS: the mail goes through the third, the log says so,
and while the first two are cached as failed the next message goes straight to the third.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine
from tests.fixtures.mailservers import SmarthostLab
from tests.fixtures.smtp_sink import Sink, free_port

pytestmark = [pytest.mark.integration]

REFUSING = "127.0.0.41"  # nothing listens there
BUSY = "127.0.0.42"  # greets with 421
SPARE = "127.0.0.43"


@pytest.fixture
def nameserver(dns_server_factory: Callable[[Sequence[str]], DnsServer]) -> str:
    return dns_server_factory([
        f"host-record=refusing.test,{REFUSING}",
        f"host-record=busy.test,{BUSY}",
        f"host-record=spare.test,{SPARE}",
        "host-record=relay.test,127.0.0.1",
    ]).nameserver


def failover_spec(hosts: list[dict[str, Any]], **smarthost: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost", "smarthost": {"hosts": hosts, **smarthost}},
        "dsn": {"notify_delayed": False},
        # Long enough that a host that failed stays skipped for the whole test.
        "limits": {"connection_failure_cache": "5m"},
    }


def sessions(sink: Sink) -> int:
    return len(sink.sessions)


@pytest.mark.slow
def test_list_skips_a_refusing_and_a_busy_host_and_delivers_through_postfix(
    postfix_smarthost: SmarthostLab, nameserver: str, engine_factory: Callable[..., Engine],
    smtp_sink: Callable[..., Sink],
) -> None:
    lab = postfix_smarthost
    closed = free_port((REFUSING,))
    busy = smtp_sink(BUSY, free_port((BUSY,)), greeting="421 4.3.2 busy.test too busy")
    engine = engine_factory(failover_spec(
        [{"host": "refusing.test", "port": closed}, {"host": "busy.test", "port": busy.port},
         {"host": "relay.test", "port": lab.port}],
        tls="starttls", ca_file=lab.ca_file,
        auth={"username": "relay", "password": lab.users["relay"]},
    ), nameserver=nameserver)

    engine.submit("app@deliverd.test", ["first@dest.test"])

    record = engine.wait_status("first@dest.test", "sent", timeout=30)
    assert record["relay"] == f"relay.test[127.0.0.1]:{lab.port}"
    assert lab.sink.wait_for(1, timeout=30), lab.postfix.log_text()
    assert "sasl_username=relay" in lab.postfix.log_text()
    assert sessions(busy) == 1

    engine.submit("app@deliverd.test", ["second@dest.test"])

    record = engine.wait_status("second@dest.test", "sent", timeout=30)
    assert record["relay"] == f"relay.test[127.0.0.1]:{lab.port}"
    assert lab.sink.wait_for(2, timeout=30)
    assert sessions(busy) == 1  # cached as failed: not asked again within the cache time


def test_every_host_cached_as_failed_is_tried_anyway(
    nameserver: str, engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    closed = free_port((REFUSING,))
    spare_port = free_port((SPARE,))
    busy = smtp_sink(BUSY, free_port((BUSY,)), greeting="421 4.3.2 busy.test too busy")
    engine = engine_factory(failover_spec(
        [{"host": "refusing.test", "port": closed}, {"host": "busy.test", "port": busy.port},
         {"host": "spare.test", "port": spare_port}],
        tls="none",
    ), nameserver=nameserver)

    engine.submit("app@deliverd.test", ["later@dest.test"])
    record = engine.wait_status("later@dest.test", "deferred", timeout=30)
    assert record["relay"] == f"spare.test[{SPARE}]:{spare_port}"
    assert sessions(busy) == 1

    spare = smtp_sink(SPARE, spare_port)  # the last host of the list comes back
    engine.cli("queue", "-c", str(engine.config), "flush")

    record = engine.wait_status("later@dest.test", "sent", timeout=30)
    assert record["relay"] == f"spare.test[{SPARE}]:{spare_port}"
    assert spare.wait_for(1)
    # Every host was cached as failed, so the list was tried in full again, in order.
    assert sessions(busy) == 2


def test_a_5xx_to_rcpt_at_the_first_host_is_final_for_the_attempt(
    nameserver: str, engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink],
) -> None:
    first = smtp_sink(BUSY, free_port((BUSY,)), rcpt="550 5.1.1 no such user")
    second = smtp_sink(SPARE, free_port((SPARE,)))
    engine = engine_factory(failover_spec(
        [{"host": "busy.test", "port": first.port}, {"host": "spare.test", "port": second.port}],
        tls="none", bounce_on_5xx=True,
    ), nameserver=nameserver)

    engine.submit("app@deliverd.test", ["nobody@dest.test"])

    record = engine.wait_status("nobody@dest.test", "bounced", timeout=30)
    assert record["relay"] == f"busy.test[{BUSY}]:{first.port}"
    time.sleep(0.5)
    assert sessions(second) == 0
