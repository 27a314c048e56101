"""``deliverd run``: the daemon's lifecycle around the scheduler and the listeners.

Signals: SIGHUP reloads (the new config is validated first; a bad one is logged and the old one
kept; the queue is never touched), SIGTERM/SIGINT stop (listeners close at once, in-flight
deliveries get a grace period, anything unfinished stays queued), SIGUSR1 wakes the scheduler
(``release`` and ``send`` send it), SIGUSR2 also forgets which hosts just failed, so a flushed
message is really tried again (``deliverd queue flush`` sends it, as Postfix's flush revives
dead destinations). Under systemd (``Type=notify``) it reports READY=1 once it
listens with the queue open, RELOADING=1/READY=1 around a reload, STOPPING=1, and pings the
watchdog from the event loop, so a wedged loop is restarted (``deliverd.ops.sdnotify``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from deliverd.config.loader import ConfigError, load_config
from deliverd.config.model import Config
from deliverd.delivery.scheduler import Scheduler
from deliverd.delivery.sts_policies import StsPolicies
from deliverd.delivery.tls_reporter import TlsReporter
from deliverd.dns.resolver import Resolver
from deliverd.ops import eventloop, sdnotify
from deliverd.ops.logline import configure_logging, format_event
from deliverd.ops.metrics import Metrics, MetricsServer, QueueShape, split_listen
from deliverd.queue import showq
from deliverd.queue.database import QueueDB, QueueError
from deliverd.queue.store import QueueStore
from deliverd.reports.notices import Notices
from deliverd.smtp.transport import Transport
from deliverd.submission.cleanup import Intake
from deliverd.submission.gate import InboundGate
from deliverd.submission.listener import start_listeners
from deliverd.submission.pickup import Pickup
from deliverd.submission.workers import SmtpWorkers

log = logging.getLogger("deliverd")

STOP_GRACE = 20.0
# How long SMTP workers' open sessions may go on once the daemon stops.
WORKER_STOP_GRACE = 1.0
METRICS_EVERY = 10.0
PID_NAME = "deliverd.pid"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def make_resolver(cfg: Config) -> Resolver:
    # With DANE on, queries ask for DNSSEC validation (the AD bit) of the spec's nameservers.
    return Resolver(
        cfg.dns.nameservers, timeout=float(cfg.timeouts.dns), dnssec=cfg.routing.direct.dane
    )


@dataclass(frozen=True)
class _Running:
    """What ``serve`` started and stops again, in the order ``_shut_down`` needs them."""

    transport: Transport
    runner: asyncio.Task[None]  # the scheduler
    pickup: asyncio.Task[None]  # the maildrop's
    showq_server: asyncio.AbstractServer | None
    periodic: tuple[asyncio.Task[None], ...]  # metrics file, TLS reports, watchdog pings
    pid_file: Path


class Daemon:
    def __init__(
        self,
        config_path: Path,
        secrets_path: Path | None,
        cfg: Config,
        log_format: str,
        log_level: str,
        prebound: dict[tuple[str, int], socket.socket] | None = None,
    ) -> None:
        self.prebound = prebound or {}
        self.config_path = config_path
        self.secrets_path = secrets_path
        self.cfg = cfg
        self.log_format = log_format
        self.log_level = log_level
        self.stop_grace = STOP_GRACE
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.gate = InboundGate(on_refused=self.metrics.inbound_refused_by)
        self._depth_db: QueueDB | None = None  # the scrape thread's own read connection
        self._stop = asyncio.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self.workers: SmtpWorkers | None = None  # limits.smtp_workers > 0
        self._retiring: set[asyncio.Task[None]] = set()  # workers finishing after a reload
        self.store: QueueStore | None = None
        self.intake: Intake | None = None
        self.scheduler: Scheduler | None = None
        self.tls_reporter: TlsReporter | None = None
        self.notifier = sdnotify.Notifier()

    async def serve(self) -> int:
        """Run until SIGTERM (or ``stop``): open the queue, listen, deliver; then stop in
        order. 1 when the queue or a listening address cannot be had, else 0."""
        store = await self._open_queue()
        if store is None:
            return 1
        transport = Transport(self.cfg, on_session=self.metrics.tls_session)
        resolver = make_resolver(self.cfg)
        # The one way into the queue, for every source: listeners, SMTP workers, the pickup,
        # and the notices the scheduler and the TLS reporter ask for.
        intake = self.intake = Intake(store, self._current, self._enqueued)
        notices = Notices(intake)
        self.scheduler = Scheduler(
            self.cfg, store, resolver, transport, log_format=self.log_format,
            metrics=self.metrics, sts=StsPolicies(resolver, store), notices=notices,
        )
        if not await self._open_endpoints(store):
            return 1
        running = await self._start(store, self.scheduler, transport, resolver, notices)
        await self._stop.wait()
        await self._shut_down(store, self.scheduler, running)
        self._event("stopped")
        return 0

    async def _open_queue(self) -> QueueStore | None:
        try:
            self.store = await QueueStore.open(self.cfg.queue.path)
        except (OSError, QueueError) as exc:
            # One line the operator can act on (often: the service user cannot reach the
            # directory), not a traceback.
            log.error("cannot open the queue %s as %s: %s", self.cfg.queue.path,
                      _user_name(), exc)
            return None
        return self.store

    async def _open_endpoints(self, store: QueueStore) -> bool:
        """The metrics endpoint, then the SMTP listeners; False (logged, all closed again)
        when an address cannot be had."""
        try:
            # The endpoint first: a port that cannot be had stops the start before any client
            # could see the SMTP listener open.
            self.metrics_server = self._serve_metrics(self.cfg)
            await self._listen(self.cfg)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            await self._close_servers()
            self._close_metrics()
            await store.close()
            return False
        return True

    async def _start(
        self, store: QueueStore, scheduler: Scheduler, transport: Transport, resolver: Resolver,
        notices: Notices,
    ) -> _Running:
        """Announce readiness and start everything that runs until the stop."""
        assert self.intake is not None
        self.metrics.watch_queue(self._queue_shape)
        pid_file = Path(self.cfg.queue.path) / PID_NAME
        pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
        self._install_signals()
        where = ", ".join(f"{x.address}:{x.port}" for x in self.cfg.listen)
        self._event(f"ready: listening on {where}, mode={self.cfg.routing.mode.value}")
        maildrop = Pickup(self.cfg.queue.path, store, self.intake)
        await maildrop.start()
        self.notifier.ready(f"listening on {where}")
        runner = asyncio.create_task(scheduler.run())
        pickup = asyncio.create_task(maildrop.run())
        showq_server = await showq.serve(self.cfg.queue.path, store)
        reporter = asyncio.create_task(self._write_metrics_every(METRICS_EVERY))
        self.tls_reporter = TlsReporter(self.cfg, store, resolver, notices)
        tls_reports = asyncio.create_task(self.tls_reporter.run())
        watchdog = asyncio.create_task(self._ping_watchdog(self.notifier.watchdog_interval))
        return _Running(transport, runner, pickup, showq_server,
                        (reporter, tls_reports, watchdog), pid_file)

    async def _shut_down(self, store: QueueStore, scheduler: Scheduler, running: _Running) -> None:
        """Stop taking mail, finish or requeue what is in flight, close the queue last."""
        self.notifier.stopping()
        for task in running.periodic:
            task.cancel()
        self._event("stopping: closing listeners, finishing in-flight deliveries")
        workers = self.workers
        self.workers = None
        workers_stopped = (
            asyncio.create_task(workers.stop(WORKER_STOP_GRACE)) if workers is not None else None
        )
        await self._close_servers()
        running.pickup.cancel()
        if running.showq_server is not None:
            running.showq_server.close()
        with contextlib.suppress(asyncio.CancelledError):
            await running.pickup
        await scheduler.stop(self.stop_grace)
        running.runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.runner
        await running.transport.close()
        if workers_stopped is not None:
            await workers_stopped  # before the store closes: their last messages go in
        for retiring in self._retiring:  # workers a reload replaced, still finishing
            retiring.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self._write_metrics()
        self._close_metrics()
        await store.close()
        with contextlib.suppress(FileNotFoundError):
            running.pid_file.unlink()

    def _current(self) -> Config:
        return self.cfg

    async def _write_metrics_every(self, seconds: float) -> None:
        while True:
            # Off the loop: the file includes the queue gauges, read from the database.
            await asyncio.to_thread(self._write_metrics)
            await asyncio.sleep(seconds)

    def _enqueued(self, queue_id: str, source: str) -> None:
        if source != "notice":  # notices are counted as sent by the scheduler's metrics
            self.metrics.message_received(source)
        if self.scheduler is not None:
            self.scheduler.wake(queue_id)

    def _serve_metrics(self, cfg: Config) -> MetricsServer | None:
        if cfg.metrics.listen is None:
            return None
        address, port = split_listen(cfg.metrics.listen)
        server = MetricsServer.start(self.metrics, address, port, cfg.metrics.allow_networks)
        log.info("metrics on http://%s/metrics", server.where)
        return server

    def _queue_shape(self) -> QueueShape:
        """Called by the metrics collector at scrape time, from the scraping thread."""
        if self._depth_db is None:
            self._depth_db = QueueDB.open(self.cfg.queue.path, create=False)
        depth = self._depth_db.depth()
        stat = os.statvfs(self.cfg.queue.path)
        return QueueShape(
            recipients=depth.recipients,
            messages=depth.messages,
            oldest_arrival=depth.oldest_arrival,
            oldest_deferred_arrival=depth.oldest_deferred_arrival,
            disk_free_bytes=stat.f_bavail * stat.f_frsize,
        )

    def _close_metrics(self) -> None:
        self.metrics.watch_queue(None)
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self._depth_db is not None:
            self._depth_db.close()
            self._depth_db = None

    async def _ping_watchdog(self, interval: float | None) -> None:
        """WATCHDOG=1 from the loop itself: a loop that stops turning stops the pings."""
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _write_metrics(self) -> None:
        try:
            self.metrics.write(self.cfg.queue.path)
        except OSError as exc:  # a full disk must not stop delivery
            log.warning("cannot write metrics: %s", exc)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self._wake)
        loop.add_signal_handler(signal.SIGUSR2, self._flush)

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

    def _flush(self) -> None:
        if self.scheduler is not None:
            self.scheduler.transport.forget_failures()
        self._wake()

    async def reload(self) -> bool:
        """Load, validate and apply the config; keep the running one when anything is wrong."""
        self.notifier.reloading()
        try:
            applied = await self._reload()
        finally:
            self.notifier.ready(f"running, mode={self.cfg.routing.mode.value}")
        self.metrics.config_reloaded(applied)
        return applied

    async def _reload(self) -> bool:
        try:
            new = await asyncio.to_thread(load_config, self.config_path, self.secrets_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        if new.queue.path != self.cfg.queue.path:
            log.error("reload refused: queue.path changes need a restart")
            return False
        old = self.cfg
        self._configure_logging(new)
        metrics_moved = new.metrics != old.metrics
        if metrics_moved and not await self._rebind_metrics(new, old):
            return False
        if (new.listen != old.listen or self.workers is not None
                or new.limits.smtp_workers > 0) and not await self._rebind(new, old):
            if metrics_moved:
                await self._rebind_metrics(old, new)
            return False
        self.cfg = new
        assert self.scheduler is not None
        resolver = make_resolver(new)
        self.scheduler.update(new, resolver)
        if self.tls_reporter is not None:
            self.tls_reporter.update(new, resolver)
        self._event(f"reloaded: mode={new.routing.mode.value}")
        return True

    async def _listen(self, cfg: Config) -> None:
        """Listen on ``cfg.listen``: in this process, or in ``cfg.limits.smtp_workers`` SMTP
        worker processes (started anew at each reload; the old ones finish their sessions).
        OSError when an address cannot be had or a worker does not start."""
        assert self.store is not None
        if cfg.limits.smtp_workers == 0:
            # Back from workers: listen on their sockets (still bound) while they finish.
            prebound = {**self.prebound, **(self.workers.sockets if self.workers else {})}
            assert self.intake is not None
            self._servers = await start_listeners(
                cfg, self.intake, current=self._current,
                prebound=prebound, gate=self.gate,
            )
            if self.workers is not None:
                task = asyncio.create_task(self.workers.stop(float(cfg.timeouts.command)))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
                self.workers = None
            return
        if self.workers is None:
            assert self.intake is not None
            workers = SmtpWorkers(self.intake, self.gate, self._current,
                                  (self.log_format, self.log_level),
                                  (sys.executable, "-m", "deliverd.worker"), self.prebound,
                                  on_exit=self.metrics.smtp_worker_exited)
            await workers.start(cfg)
            self.workers = workers
        else:
            await self.workers.replace(cfg)

    async def _rebind(self, new: Config, old: Config) -> bool:
        assert self.store is not None and self.scheduler is not None
        await self._close_servers()
        try:
            await self._listen(new)
            return True
        except OSError as exc:
            log.error("reload refused: cannot listen on the new addresses: %s", exc)
            await self._listen(old)
            return False

    async def _rebind_metrics(self, new: Config, old: Config) -> bool:
        # In a thread: stopping the HTTP server waits for its poll loop to notice.
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
            self.metrics_server = None
        try:
            self.metrics_server = self._serve_metrics(new)
            return True
        except OSError as exc:
            log.error("reload refused: cannot serve metrics on %s: %s", new.metrics.listen, exc)
            try:
                self.metrics_server = self._serve_metrics(old)
            except OSError as again:  # taken meanwhile: delivery goes on without an endpoint
                log.error("cannot serve metrics on %s again: %s", old.metrics.listen, again)
            return False

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    def _configure_logging(self, cfg: Config) -> None:
        # Mask every password of the old and the new config: a line about the old smart host
        # may still be written while the new one takes over.
        secrets = (*self.cfg.secrets(), *cfg.secrets())
        configure_logging(self.log_format, self.log_level, sys.stderr, secrets=secrets)

    def _event(self, text: str) -> None:
        log.info(format_event("deliverd", text, fmt=self.log_format))


def run(
    config_path: Path,
    secrets_path: Path | None,
    log_format: str,
    log_level: str,
    *,
    stop_grace: float = STOP_GRACE,
    prebound: dict[tuple[str, int], socket.socket] | None = None,
) -> int:
    """Run the daemon until stopped; ``prebound``: sockets bound before dropping root."""
    configure_logging(log_format, log_level, sys.stderr)
    try:
        cfg = load_config(config_path, secrets_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    daemon = Daemon(config_path, secrets_path, cfg, log_format, log_level, prebound)
    daemon.stop_grace = stop_grace
    daemon._configure_logging(cfg)
    return eventloop.run(daemon.serve())
