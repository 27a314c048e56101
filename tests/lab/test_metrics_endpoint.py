"""The Prometheus endpoint of a running engine (``metrics.listen``): scraped over HTTP while
mail flows through it to a local sink, across reloads, and checked by promtool."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deliverd_lab.prometheus import PrometheusMissing, promtool
from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine, free_port
from tests.fixtures.smtp_sink import Sink

pytestmark = pytest.mark.integration

SENDER = "alice@example.test"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def metric(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def spec(sink_port: int, metrics_port: int, **smarthost: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none",
                                  **smarthost}},
        "dsn": {"notify_delayed": False},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }


def test_endpoint_counts_received_sent_and_rejected_mail(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink(rcpt={"nobody@example.net": "550 5.1.1 no such user"})
    engine = engine_factory(spec(sink.port, free_port(), bounce_on_5xx=True))
    before = samples(engine.scrape())
    assert metric(before, "deliverd_messages_received_total", way="listener") == 0
    assert metric(before, "deliverd_config_generation") == 1
    engine.submit(SENDER, ["bob@example.net", "carol@example.net"])
    engine.submit(SENDER, ["nobody@example.net"])
    engine.wait_status("carol@example.net", "sent")
    engine.wait_status("nobody@example.net", "bounced")
    # The failure DSN to alice goes to the same sink: wait for it so the counts are final.
    engine.wait_status(SENDER, "sent")
    found = samples(engine.scrape())
    assert metric(found, "deliverd_messages_received_total", way="listener") == 2
    assert metric(found, "deliverd_recipients_total", status="sent", route="smarthost") == 3
    assert metric(found, "deliverd_recipients_total", status="bounced", route="smarthost") == 1
    assert metric(found, "deliverd_delivery_delay_seconds_count", status="sent") == 3
    assert metric(found, "deliverd_dsn_sent_total", kind="failure") == 1
    assert metric(found, "deliverd_tls_sessions_total", result="cleartext") >= 1
    assert metric(found, "deliverd_queue_recipients", state="pending") == 0
    assert metric(found, "deliverd_queue_messages") == 0
    assert metric(found, "deliverd_queue_disk_free_bytes") > 0


def test_endpoint_shows_deferred_mail_in_the_queue_gauges(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink(rcpt={"later@example.net": "451 4.3.0 try again"})
    engine = engine_factory(spec(sink.port, free_port()))
    engine.submit(SENDER, ["later@example.net"])
    engine.wait_status("later@example.net", "deferred")
    found = samples(engine.scrape())
    assert metric(found, "deliverd_queue_recipients", state="deferred") == 1
    assert metric(found, "deliverd_queue_messages") == 1
    assert metric(found, "deliverd_queue_oldest_deferred_age_seconds") >= 0
    assert metric(found, "deliverd_deferred_attempts_total", status_class="4.3") >= 1
    assert metric(found, "deliverd_recipients_total", status="sent", route="smarthost") == 0


def test_connection_failures_are_counted_by_kind(
    engine_factory: Callable[..., Engine],
) -> None:
    closed = free_port()  # nothing listens there: connection refused
    engine = engine_factory(spec(closed, free_port()))
    engine.submit(SENDER, ["bob@example.net"])
    engine.wait_status("bob@example.net", "deferred")
    found = samples(engine.scrape())
    assert metric(found, "deliverd_connection_failures_total", kind="refused") >= 1


def test_reloads_move_the_generation_and_a_refused_one_is_flagged(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    engine = engine_factory(spec(sink.port, free_port()))
    engine.wait_ready()  # SIGHUP before the handlers are installed would stop the daemon
    engine.signal(signal.SIGHUP)
    engine.wait_for(lambda: metric(samples(engine.scrape()), "deliverd_config_generation") == 2,
                    what="generation 2")
    text = engine.config.read_text()
    engine.config.write_text(text.replace(f"port = {sink.port}", "port = 70000"))
    engine.signal(signal.SIGHUP)
    engine.wait_for(lambda: "reload refused" in engine.log_text(), what="refused reload")
    found = samples(engine.scrape())
    assert metric(found, "deliverd_config_last_reload_successful") == 0
    assert metric(found, "deliverd_config_reload_failures_total") == 1
    assert metric(found, "deliverd_config_generation") == 2


def test_reload_moves_the_endpoint_to_its_new_address(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    first, second = free_port(), free_port()
    engine = engine_factory(spec(sink.port, first))
    engine.wait_ready()
    engine.reconfigure({"metrics": {"listen": f"127.0.0.1:{second}"}})
    engine.signal(signal.SIGHUP)
    engine.wait_for(lambda: "reloaded" in engine.log_text(), what="reload")
    assert metric(samples(engine.scrape()), "deliverd_config_generation") == 2
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", first), timeout=2):
        pass


def test_an_endpoint_that_cannot_bind_stops_the_start(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        engine = engine_factory(spec(sink.port, port), start=False)
        with pytest.raises(RuntimeError, match="cannot listen"):
            engine.start()


def test_promtool_accepts_the_live_endpoint(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    engine = engine_factory(spec(sink.port, free_port()))
    engine.submit(SENDER, ["bob@example.net"])
    engine.wait_status("bob@example.net", "sent")
    try:
        result = promtool("check", "metrics", stdin=engine.scrape().encode())
    except PrometheusMissing as exc:
        pytest.skip(str(exc))
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    assert not result.stdout.strip() and not result.stderr.strip(), result


def test_reload_to_a_taken_address_is_refused_and_the_old_endpoint_answers(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    engine = engine_factory(spec(sink.port, free_port()))
    first = engine.spec["metrics"]["listen"]
    engine.wait_ready()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        engine.reconfigure({"metrics": {"listen": f"127.0.0.1:{taken.getsockname()[1]}"}})
        engine.signal(signal.SIGHUP)
        engine.wait_for(lambda: "cannot serve metrics" in engine.log_text(), what="refusal")
    engine.spec["metrics"]["listen"] = first  # scrape where the daemon still serves
    found = samples(engine.scrape())
    assert metric(found, "deliverd_config_last_reload_successful") == 0
    assert metric(found, "deliverd_config_generation") == 1


def test_dns_failures_are_counted_by_kind(
    engine_factory: Callable[..., Engine], lab_dns: DnsServer
) -> None:
    engine = engine_factory({"metrics": {"listen": f"127.0.0.1:{free_port()}"}},
                            nameserver=lab_dns.nameserver)
    # The null sender: a bounce is held, never sent, so no DSN needs a route.
    engine.submit("", ["a@nxdomain.test", "b@nullmx.test", "c@servfail.example",
                       "d@mxnoaddr.test"])
    for rcpt in ("a@nxdomain.test", "b@nullmx.test", "c@servfail.example", "d@mxnoaddr.test"):
        engine.wait_for(lambda rcpt=rcpt: engine.attempts(rcpt), what=f"attempt for {rcpt}")
    found = samples(engine.scrape())
    for kind in ("nxdomain", "null_mx", "temporary", "no_address"):
        assert metric(found, "deliverd_dns_failures_total", kind=kind) >= 1, kind
    # Refused by DNS before any host was tried: no route, and held (a bounce of a bounce).
    assert metric(found, "deliverd_recipients_total", status="held", route="none") >= 2


def test_tls_sessions_are_counted_by_result(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink], ca_file: str
) -> None:
    sink = smtp_sink(starttls=True)
    trusted = engine_factory(spec(sink.port, free_port(), tls="starttls", ca_file=ca_file))
    trusted.submit(SENDER, ["bob@example.net"])
    trusted.wait_status("bob@example.net", "sent")
    found = samples(trusted.scrape())
    assert metric(found, "deliverd_tls_sessions_total", result="established") == 1
    assert metric(found, "deliverd_tls_sessions_total", result="failed") == 0
    # Without the private CA the certificate does not verify: TLS failed, mail deferred.
    untrusted = engine_factory(spec(sink.port, free_port(), tls="starttls"))
    untrusted.submit(SENDER, ["carol@example.net"])
    untrusted.wait_status("carol@example.net", "deferred")
    found = samples(untrusted.scrape())
    assert metric(found, "deliverd_tls_sessions_total", result="failed") >= 1
    assert metric(found, "deliverd_tls_sessions_total", result="established") == 0
    assert metric(found, "deliverd_smarthost_failures_total", stage="tls") >= 1


def test_an_expired_recipient_counts_as_expired_once_with_its_whole_delay(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink(rcpt={"later@example.net": "451 4.3.0 try again"})
    engine = engine_factory({**spec(sink.port, free_port()),
                             "retry": {"expire_after": "3s"}})
    engine.submit(SENDER, ["later@example.net"])
    engine.wait_status("later@example.net", "bounced")
    engine.wait_status(SENDER, "sent")  # the expiry DSN
    found = samples(engine.scrape())
    assert metric(found, "deliverd_recipients_total", status="expired", route="smarthost") == 1
    assert metric(found, "deliverd_recipients_total", status="bounced", route="smarthost") == 0
    assert metric(found, "deliverd_delivery_delay_seconds_count", status="expired") == 1
    assert metric(found, "deliverd_delivery_delay_seconds_sum", status="expired") >= 3
    assert metric(found, "deliverd_delivery_attempts_total", result="deferred") >= 1


def test_endpoint_answers_throughout_a_burst_and_its_counters_only_grow(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    engine = engine_factory(spec(sink.port, free_port()))
    engine.wait_ready()
    seen: list[float] = []
    stop = threading.Event()

    def scrape_until_stopped() -> None:
        while not stop.is_set():
            found = samples(engine.scrape())
            seen.append(metric(found, "deliverd_recipients_total", status="sent",
                               route="smarthost"))

    scraper = threading.Thread(target=scrape_until_stopped)
    scraper.start()
    try:
        for i in range(40):
            engine.submit(SENDER, [f"r{i}@example.net"])
        engine.wait_for(lambda: len(sink.messages) == 40, what="40 messages at the sink")
        engine.wait_for(lambda: seen and seen[-1] == 40, what="the scrape to show 40 sent")
    finally:
        stop.set()
        scraper.join(30)
    assert seen == sorted(seen) and len(seen) >= 2
