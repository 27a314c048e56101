"""What the engine did and what its queue holds, as Prometheus metrics.

One ``CollectorRegistry`` per daemon holds every ``deliverd_*`` metric. Counters and the delivery
delay histogram are updated by the stages as they work (each update is a lock and an addition,
safe from any thread); the queue's shape, the disk free for it and the config state are read at
scrape time by a custom collector, so they are never stale and cost nothing between scrapes.

The registry is exposed two ways: an HTTP endpoint (``metrics.listen``: ``prometheus_client``'s
WSGI app served from its own thread, so a scrape never waits for the event loop and a busy loop
never delays a scrape) and ``<queue.path>/deliverd.prom``, the same text for node_exporter's
textfile collector on hosts that do not open a port.

Labels are bounded: ways in, final states, routes, failure kinds and enhanced status classes,
never addresses, domains or queue ids.
"""

from __future__ import annotations

import ipaddress
import logging
import platform
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
    write_to_textfile,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deliverd import __version__

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("deliverd")

TEXTFILE_NAME = "deliverd.prom"

# A "_created" series beside every counter and histogram doubles the scrape for a value nobody
# graphs; the process start time is deliverd_start_time_seconds.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Arrival to final status: from a message relayed at once to one that waited out its expiry.
DELAY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)

WAYS_IN = ("listener", "sendmail")
DELIVERED_TLS = ("dane", "mta-sts", "verified", "encrypted", "none")
FINAL_STATUSES = ("sent", "bounced", "expired", "held")
ROUTES = ("direct", "smarthost", "none")
SMARTHOST_STAGES = ("auth", "tls", "pop")
DNS_FAILURES = ("nxdomain", "null_mx", "no_address", "temporary")
TLS_RESULTS = ("established", "cleartext", "failed")
CONNECTION_FAILURES = ("refused", "timeout", "unreachable", "lost", "greeting", "other")
QUEUE_STATES = ("pending", "deferred", "held")
INBOUND_LIMITS = ("max_inbound_sessions", "max_inbound_per_client")

_STATUS_CLASS = re.compile(r"^([245])\.([0-9]{1,3})\.[0-9]{1,3}$")


def status_class(status: str | None) -> str:
    """``4.4.1`` -> ``4.4``: the class and subject of an enhanced status (RFC 3463), a label
    with a few dozen values at most; anything else is ``other``."""
    match = _STATUS_CLASS.match(status or "")
    if match is None or int(match.group(2)) > 7:
        return "other"
    return f"{match.group(1)}.{match.group(2)}"


def connection_failure_kind(error: str) -> str:
    """A connect or greeting failure's text (from ``deliverd.smtp.errors``) -> a label value."""
    text = error.lower()
    for needle, kind in (
        ("refused", "refused"), ("timed out", "timeout"), ("timeout", "timeout"),
        ("unreachable", "unreachable"), ("no route", "unreachable"), ("lost", "lost"),
        ("reset", "lost"),
    ):
        if needle in text:
            return kind
    return "other"


@dataclass(frozen=True)
class QueueShape:
    """The queue at one instant, as the scrape-time collector reports it."""

    recipients: dict[str, int] = field(default_factory=dict)  # state -> count
    messages: int = 0
    oldest_arrival: float | None = None  # unix time of the oldest queued message
    oldest_deferred_arrival: float | None = None  # of the oldest message with a deferred rcpt
    disk_free_bytes: int | None = None


class _ScrapeCollector(Collector):
    """Values read when Prometheus asks: the queue's shape and the config state."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        yield from self._metrics.collect_queue()
        yield from self._metrics.collect_config()


class Metrics:
    """Every ``deliverd_*`` metric of one daemon, in one registry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "deliverd_messages_received", "Messages accepted into the queue, by way in.",
            ["way"], registry=r)
        self.recipients = Counter(
            "deliverd_recipients", "Recipients that reached a final status, by route.",
            ["status", "route"], registry=r)
        self.delivered_tls_total = Counter(
            "deliverd_delivered_tls",
            "Recipients delivered, by how the session was protected (the log line's tls=).",
            ["tls"], registry=r)
        self.route_recipients = Counter(
            "deliverd_route_recipients",
            "Recipients of a named route (routes[]) that reached a final status.",
            ["route_name", "status"], registry=r)
        self.attempts = Counter(
            "deliverd_delivery_attempts",
            "Delivery attempts per recipient, by result (sent, deferred, bounced, held).",
            ["result"], registry=r)
        self.deferred = Counter(
            "deliverd_deferred_attempts",
            "Recipient attempts deferred, by enhanced status class and subject (4.4, 4.7, ...).",
            ["status_class"], registry=r)
        self.delay = Histogram(
            "deliverd_delivery_delay_seconds",
            "Time from a message's arrival to a recipient's final status (once per recipient).",
            ["status"], buckets=DELAY_BUCKETS, registry=r)
        self.smarthost_failures = Counter(
            "deliverd_smarthost_failures",
            "Smart host failures only an operator fixes (mail deferred, never bounced).",
            ["stage"], registry=r)
        self.dns_failures = Counter(
            "deliverd_dns_failures", "DNS lookups for delivery that failed, by kind.",
            ["kind"], registry=r)
        self.tls_sessions = Counter(
            "deliverd_tls_sessions", "Outbound SMTP sessions opened, by TLS result.",
            ["result"], registry=r)
        self.connection_failures = Counter(
            "deliverd_connection_failures",
            "Outbound connections that failed before a transaction, by kind.",
            ["kind"], registry=r)
        self.dsn = Counter(
            "deliverd_dsn_sent", "Delivery status notifications queued, by kind.",
            ["kind"], registry=r)
        self.inbound_refused = Counter(
            "deliverd_inbound_refused",
            "Inbound SMTP connections refused with 421, by the limit reached.",
            ["reason"], registry=r)
        self.reload_failures = Counter(
            "deliverd_config_reload_failures", "Reloads refused (the running config kept).",
            registry=r)
        self.smtp_worker_exits = Counter(
            "deliverd_smtp_worker_exits",
            "SMTP worker processes that ended unexpectedly (each is started again).",
            registry=r)
        build = Gauge(
            "deliverd_build_info", "The running engine's version (always 1).",
            ["version", "python_version"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        Gauge("deliverd_start_time_seconds", "When the daemon started (unix time).",
              registry=r).set(self.started)
        self._init_labels()
        self._generation = 1
        self._last_reload_ok = True
        self._last_reload_time = self.started
        self._queue_source: Callable[[], QueueShape] | None = None
        self._queue_lock = threading.Lock()  # held during a scrape's read of the queue
        self._config_lock = threading.Lock()  # never held long: the event loop takes it
        r.register(_ScrapeCollector(self))

    def _init_labels(self) -> None:
        # Every known series exists from the start at 0, so rate() and absent() work at once.
        for way in WAYS_IN[:1]:  # "sendmail" appears with the first message it brings
            self.received.labels(way)
        for status in FINAL_STATUSES:
            self.delay.labels(status)
            for route in ROUTES[:2]:
                self.recipients.labels(status, route)
        for result in ("sent", "deferred", "bounced", "held"):
            self.attempts.labels(result)
        for protection in DELIVERED_TLS:
            self.delivered_tls_total.labels(protection)
        for stage in SMARTHOST_STAGES:
            self.smarthost_failures.labels(stage)
        for kind in DNS_FAILURES:
            self.dns_failures.labels(kind)
        for result in TLS_RESULTS:
            self.tls_sessions.labels(result)
        for kind in CONNECTION_FAILURES:
            self.connection_failures.labels(kind)
        for kind in ("failure", "delay", "relayed"):
            self.dsn.labels(kind)
        for reason in INBOUND_LIMITS:
            self.inbound_refused.labels(reason)

    # -- what the stages report ---------------------------------------------------------------

    def message_received(self, way: str = "listener") -> None:
        self.received.labels(way).inc()

    def attempt(self, result: str, status: str | None) -> None:
        """One recipient's attempt ended with ``result`` (``sent``, ``deferred``, ...)."""
        self.attempts.labels(result).inc()
        if result == "deferred":
            self.deferred.labels(status_class(status)).inc()

    def recipient_final(self, status: str, route: str | None, delay: float,
                        route_name: str | None = None) -> None:
        """A recipient reached ``status`` (sent, bounced, expired, held): once per recipient.
        ``route_name``: the routes[] entry it took (names come from the config: bounded)."""
        self.recipients.labels(status, route or "none").inc()
        self.delay.labels(status).observe(max(0.0, delay))
        if route_name is not None:
            self.route_recipients.labels(route_name, status).inc()

    def delivered_tls(self, protection: str) -> None:
        """A recipient delivered over a session protected as ``protection`` (dane, mta-sts,
        verified, encrypted, none)."""
        self.delivered_tls_total.labels(protection).inc()

    def smarthost_failure(self, stage: str) -> None:
        self.smarthost_failures.labels(stage).inc()

    def dns_failure(self, kind: str) -> None:
        self.dns_failures.labels(kind).inc()

    def tls_session(self, result: str) -> None:
        self.tls_sessions.labels(result).inc()

    def connection_failure(self, kind: str) -> None:
        self.connection_failures.labels(kind).inc()

    def inbound_refused_by(self, reason: str) -> None:
        """A new inbound connection got 421: ``reason`` is the limit it hit."""
        self.inbound_refused.labels(reason).inc()

    def smtp_worker_exited(self) -> None:
        """An SMTP worker process ended without being asked to (limits.smtp_workers)."""
        self.smtp_worker_exits.inc()

    def dsn_sent(self, kind: str) -> None:
        self.dsn.labels(kind).inc()

    def config_reloaded(self, ok: bool) -> None:
        with self._config_lock:
            self._last_reload_ok = ok
            if ok:
                self._generation += 1
                self._last_reload_time = self._clock()
        if not ok:
            self.reload_failures.inc()

    def watch_queue(self, source: Callable[[], QueueShape] | None) -> None:
        """``source()`` is called at each scrape (from the scraping thread) for queue gauges.

        Once ``watch_queue(None)`` returns, no call of the previous source is running."""
        with self._queue_lock:
            self._queue_source = source

    # -- reading ------------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent): for tests and the log."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def collect_queue(self) -> Iterable[Metric]:
        try:
            with self._queue_lock:
                if self._queue_source is None:
                    return
                shape = self._queue_source()
        except Exception as exc:  # a scrape must answer even when the queue cannot be read
            log.warning("metrics: cannot read the queue: %s", exc)
            return
        now = self._clock()
        depth = GaugeMetricFamily(
            "deliverd_queue_recipients", "Queued recipients by state.", labels=["state"])
        for state in QUEUE_STATES:
            depth.add_metric([state], shape.recipients.get(state, 0))
        yield depth
        yield GaugeMetricFamily("deliverd_queue_messages", "Messages in the queue.",
                                value=shape.messages)
        yield GaugeMetricFamily(
            "deliverd_queue_oldest_message_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty).",
            value=_age(now, shape.oldest_arrival))
        yield GaugeMetricFamily(
            "deliverd_queue_oldest_deferred_age_seconds",
            "Age of the oldest message with a deferred recipient (0 when none).",
            value=_age(now, shape.oldest_deferred_arrival))
        if shape.disk_free_bytes is not None:
            yield GaugeMetricFamily(
                "deliverd_queue_disk_free_bytes",
                "Bytes free for the queue (for an unprivileged writer).",
                value=shape.disk_free_bytes)

    def collect_config(self) -> Iterable[Metric]:
        with self._config_lock:
            generation, ok, when = self._generation, self._last_reload_ok, self._last_reload_time
        yield GaugeMetricFamily(
            "deliverd_config_generation",
            "Configs applied since start: 1 at start, +1 per successful reload.",
            value=generation)
        yield GaugeMetricFamily(
            "deliverd_config_last_reload_successful",
            "1 when the last reload (or the start) applied its config, 0 when it was refused.",
            value=1 if ok else 0)
        yield GaugeMetricFamily(
            "deliverd_config_last_reload_success_timestamp_seconds",
            "When the running config was applied (unix time).", value=when)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, as the endpoint serves it."""
        return generate_latest(self.registry)

    def write(self, directory: str | Path) -> Path:
        """Atomically replace ``directory/deliverd.prom`` (for node_exporter's textfile
        collector; readers never see half a file)."""
        path = Path(directory) / TEXTFILE_NAME
        write_to_textfile(str(path), self.registry)
        return path


def _age(now: float, arrival: float | None) -> float:
    return 0.0 if arrival is None else max(0.0, now - arrival)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood the log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint: ``prometheus_client``'s WSGI app served from its own thread.

    Loopback clients are always answered; others only from ``allow_networks`` (403 otherwise),
    the same rule as the SMTP listeners.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread, where: str) -> None:
        self._server = server
        self._thread = thread
        self.where = where

    @classmethod
    def start(
        cls, metrics: Metrics, address: str, port: int, allow_networks: Iterable[str] = ()
    ) -> MetricsServer:
        """Bind and serve; raises OSError when the address cannot be bound."""
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        app = _guarded(make_wsgi_app(metrics.registry), networks)
        server_class = _ThreadingServer6 if ":" in address else _ThreadingServer
        server = make_server(address, port, app, server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="deliverd-metrics",
                                  daemon=True)
        thread.start()
        bound = server.server_address[1]
        where = f"[{address}]:{bound}" if ":" in address else f"{address}:{bound}"
        return cls(server, thread, where)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_allowed(peer: str, networks: tuple[_Net, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or any(ip in net for net in networks)


def _guarded(app: WSGIApplication, networks: tuple[_Net, ...]) -> WSGIApplication:
    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not client_allowed(str(environ.get("REMOTE_ADDR", "")), networks):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"not in metrics.allow_networks\n"]
        return app(environ, start_response)

    return guarded


def split_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9154`` or ``[::1]:9154`` -> (address, port)."""
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        return address, int(rest.removeprefix(":"))
    address, _, port = text.rpartition(":")
    return address, int(port)
