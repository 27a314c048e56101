"""The Prometheus metrics without a running engine: names, labels, the queue collector, the
endpoint's access rule and the textfile output, and promtool's verdict on the exposition."""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deliverd import __version__
from deliverd.ops.metrics import (
    TEXTFILE_NAME,
    Metrics,
    MetricsServer,
    QueueShape,
    client_allowed,
    connection_failure_kind,
    split_listen,
    status_class,
)
from deliverd.queue.database import QueueDB, RcptState, RecipientUpdate
from deliverd.queue.message import NewMessage
from deliverd_lab.prometheus import PrometheusMissing, promtool
from tests.fixtures.engine import free_port

NOW = 1_700_000_000.0


def busy_metrics() -> Metrics:
    """Every kind of update once or more, and a queue collector."""
    m = Metrics(clock=lambda: NOW)
    m.message_received("listener")
    m.attempt("sent", "2.0.0")
    m.attempt("deferred", "4.4.1")
    m.attempt("deferred", "4.7.8")
    m.recipient_final("sent", "smarthost", 3.0)
    m.recipient_final("bounced", "direct", 120.0)
    m.smarthost_failure("auth")
    m.dns_failure("nxdomain")
    m.tls_session("established")
    m.connection_failure("refused")
    m.dsn_sent("failure")
    m.watch_queue(lambda: QueueShape({"deferred": 4, "pending": 1}, 3, NOW - 50, NOW - 40, 10**9))
    return m


@pytest.mark.parametrize(("status", "label"), [
    ("4.4.1", "4.4"),
    ("4.7.8", "4.7"),
    ("5.1.1", "5.1"),
    ("2.0.0", "2.0"),
    ("4.9.1", "other"),  # no subject 9 in RFC 3463: not a new label value
    ("4.44.1", "other"),
    ("x.y.z", "other"),
    ("", "other"),
    (None, "other"),
])
def test_deferred_attempts_are_labelled_by_status_class_and_subject(
    status: str | None, label: str
) -> None:
    assert status_class(status) == label


@pytest.mark.parametrize(("error", "kind"), [
    ("Connection refused", "refused"),
    ("connection timed out", "timeout"),
    ("timeout at greeting", "timeout"),
    ("Network is unreachable", "unreachable"),
    ("No route to host", "unreachable"),
    ("lost connection at greeting", "lost"),
    ("Connection reset by peer", "lost"),
    ("Permission denied", "other"),
])
def test_connection_failures_fall_into_few_kinds(error: str, kind: str) -> None:
    assert connection_failure_kind(error) == kind


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_metric_has_the_deliverd_prefix_and_counters_end_in_total() -> None:
    text = busy_metrics().exposition().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names and all(name.startswith("deliverd_") for name in names)
    types = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE")}
    counters = [name for name, kind in types.items() if kind == "counter"]
    assert counters and all(name.endswith("_total") for name in counters), counters
    assert "_created" not in text  # one series per counter, not two
    # No label that could grow with the traffic: addresses, domains, queue ids, hosts.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert not set(sample.labels) & {"address", "domain", "queue_id", "host", "relay"}


def test_updates_show_as_samples() -> None:
    m = busy_metrics()
    assert m.value("deliverd_messages_received_total", way="listener") == 1
    assert m.value("deliverd_recipients_total", status="sent", route="smarthost") == 1
    assert m.value("deliverd_recipients_total", status="bounced", route="direct") == 1
    assert m.value("deliverd_deferred_attempts_total", status_class="4.4") == 1
    assert m.value("deliverd_deferred_attempts_total", status_class="4.7") == 1
    assert m.value("deliverd_delivery_attempts_total", result="deferred") == 2
    assert m.value("deliverd_smarthost_failures_total", stage="auth") == 1
    assert m.value("deliverd_dns_failures_total", kind="nxdomain") == 1
    assert m.value("deliverd_tls_sessions_total", result="established") == 1
    assert m.value("deliverd_connection_failures_total", kind="refused") == 1
    assert m.value("deliverd_dsn_sent_total", kind="failure") == 1


def test_delay_histogram_counts_each_final_recipient_once_in_its_bucket() -> None:
    m = busy_metrics()
    assert m.value("deliverd_delivery_delay_seconds_count", status="sent") == 1
    assert m.value("deliverd_delivery_delay_seconds_bucket", status="sent", le="1.0") == 0
    assert m.value("deliverd_delivery_delay_seconds_bucket", status="sent", le="5.0") == 1
    assert m.value("deliverd_delivery_delay_seconds_bucket", status="bounced", le="60.0") == 0
    assert m.value("deliverd_delivery_delay_seconds_bucket", status="bounced", le="300.0") == 1
    assert m.value("deliverd_delivery_delay_seconds_sum", status="bounced") == 120


def test_known_series_exist_at_zero_before_anything_happens() -> None:
    m = Metrics()
    assert m.registry.get_sample_value(
        "deliverd_smarthost_failures_total", {"stage": "auth"}) == 0
    assert m.registry.get_sample_value(
        "deliverd_recipients_total", {"status": "expired", "route": "direct"}) == 0


def test_queue_gauges_are_read_at_scrape_time() -> None:
    m = busy_metrics()
    assert m.value("deliverd_queue_recipients", state="deferred") == 4
    assert m.value("deliverd_queue_recipients", state="pending") == 1
    assert m.value("deliverd_queue_recipients", state="held") == 0
    assert m.value("deliverd_queue_messages") == 3
    assert m.value("deliverd_queue_oldest_message_age_seconds") == 50
    assert m.value("deliverd_queue_oldest_deferred_age_seconds") == 40
    assert m.value("deliverd_queue_disk_free_bytes") == 10**9


def test_a_queue_that_cannot_be_read_leaves_the_rest_of_the_scrape_intact() -> None:
    m = busy_metrics()

    def broken() -> QueueShape:
        raise OSError("disk gone")

    m.watch_queue(broken)
    text = m.exposition().decode()
    assert "deliverd_queue_recipients" not in text
    assert "deliverd_messages_received_total" in text


def test_config_generation_grows_on_reload_and_a_refused_reload_shows() -> None:
    m = Metrics(clock=lambda: NOW)
    assert m.value("deliverd_config_generation") == 1
    assert m.value("deliverd_config_last_reload_successful") == 1
    m.config_reloaded(True)
    assert m.value("deliverd_config_generation") == 2
    m.config_reloaded(False)
    assert m.value("deliverd_config_generation") == 2
    assert m.value("deliverd_config_last_reload_successful") == 0
    assert m.value("deliverd_config_reload_failures_total") == 1
    m.config_reloaded(True)
    assert m.value("deliverd_config_last_reload_successful") == 1


def test_build_info_names_the_version() -> None:
    info = families(Metrics().exposition().decode())["deliverd_build_info"]
    [sample] = info.samples  # type: ignore[attr-defined]
    assert sample.labels["version"] == __version__ and sample.value == 1


def test_depth_of_a_real_queue_counts_open_recipients_and_oldest_arrivals(
    tmp_path: Path,
) -> None:
    with QueueDB.open(tmp_path / "q") as db:
        empty = db.depth()
        assert (empty.messages, empty.oldest_arrival, empty.oldest_deferred_arrival) == (0, None,
                                                                                         None)
        first = db.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], b"x"), now=NOW - 300)
        db.enqueue(NewMessage("a@x.test", ["d@z.test"], b"x"), now=NOW - 200)
        db.enqueue(NewMessage("a@x.test", ["e@z.test"], b"x", hold_reason="loop"), now=NOW - 100)
        db.record(first, [RecipientUpdate("b@y.test", RcptState.DELIVERED)])
        assert db.depth().oldest_deferred_arrival is None
        third = db.due(NOW)[1].queue_id
        db.record(third, [RecipientUpdate("d@z.test", RcptState.DEFERRED, NOW + 60)])
        depth = db.depth()
    assert depth.recipients == {"pending": 1, "deferred": 1, "held": 1}
    assert depth.messages == 3
    assert depth.oldest_arrival == NOW - 300
    assert depth.oldest_deferred_arrival == NOW - 200


def test_textfile_holds_the_same_metrics_in_text_format(tmp_path: Path) -> None:
    path = busy_metrics().write(tmp_path)
    assert path.name == TEXTFILE_NAME
    fams = families(path.read_text())
    assert "deliverd_messages_received" in fams
    assert "deliverd_queue_recipients" in fams
    assert not list(tmp_path.glob("*.tmp*"))  # replaced atomically, nothing left behind


def test_endpoint_serves_the_registry_over_http() -> None:
    port = free_port("127.0.0.1")
    server = MetricsServer.start(busy_metrics(), "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
    finally:
        server.close()
    assert 'deliverd_messages_received_total{way="listener"} 1.0' in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize(("peer", "networks", "allowed"), [
    ("127.0.0.1", [], True),
    ("127.0.0.9", [], True),
    ("::1", [], True),
    ("192.0.2.7", [], False),
    ("192.0.2.7", ["192.0.2.0/24"], True),
    ("::ffff:192.0.2.7", ["192.0.2.0/24"], True),
    ("198.51.100.1", ["192.0.2.0/24"], False),
    ("2001:db8::5", ["2001:db8::/64"], True),
    ("", ["192.0.2.0/24"], False),
])
def test_only_loopback_and_allowed_networks_may_scrape(
    peer: str, networks: list[str], allowed: bool
) -> None:
    nets = tuple(ipaddress.ip_network(n) for n in networks)
    assert client_allowed(peer, nets) is allowed


@pytest.mark.parametrize(("text", "parts"), [
    ("127.0.0.1:9154", ("127.0.0.1", 9154)),
    ("[::1]:9154", ("::1", 9154)),
])
def test_listen_address_is_split_into_address_and_port(
    text: str, parts: tuple[str, int]
) -> None:
    assert split_listen(text) == parts


def test_promtool_accepts_the_exposition() -> None:
    try:
        result = promtool("check", "metrics", stdin=busy_metrics().exposition())
    except PrometheusMissing as exc:
        pytest.skip(str(exc))
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    # promtool prints lint findings (missing _total, non-base units...) even with exit 0.
    assert not result.stdout.strip() and not result.stderr.strip(), result


def test_endpoint_serves_on_ipv6_loopback() -> None:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    server = MetricsServer.start(busy_metrics(), "::1", port)
    try:
        assert server.where == f"[::1]:{port}"
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as reply:
            assert b"deliverd_build_info" in reply.read()
    finally:
        server.close()
