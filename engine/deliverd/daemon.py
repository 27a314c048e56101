"""``deliverd run``: the daemon's lifecycle around the scheduler and the listeners.

Signals: SIGHUP reloads (the new config is validated first; a bad one is logged and the old one
kept; the queue is never touched), SIGTERM/SIGINT stop (listeners close at once, in-flight
deliveries get a grace period, anything unfinished stays queued), SIGUSR1 wakes the scheduler
(``deliverd queue flush`` sends it). Under systemd (``Type=notify``) it reports READY=1 once it
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
import sys
from pathlib import Path

from deliverd.config.loader import ConfigError, load_config
from deliverd.config.model import Config
from deliverd.delivery.scheduler import Scheduler
from deliverd.dns.resolver import Resolver
from deliverd.ops import eventloop, sdnotify
from deliverd.ops.logline import configure_logging, format_event
from deliverd.ops.metrics import Metrics
from deliverd.queue.database import QueueError
from deliverd.queue.store import QueueStore
from deliverd.smtp.transport import Transport
from deliverd.submission.listener import start_listeners

log = logging.getLogger("deliverd")

STOP_GRACE = 20.0
METRICS_EVERY = 10.0
PID_NAME = "deliverd.pid"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def make_resolver(cfg: Config) -> Resolver:
    return Resolver(cfg.dns.nameservers, timeout=float(cfg.timeouts.dns))


class Daemon:
    def __init__(
        self,
        config_path: Path,
        secrets_path: Path | None,
        cfg: Config,
        log_format: str,
        log_level: str,
    ) -> None:
        self.config_path = config_path
        self.secrets_path = secrets_path
        self.cfg = cfg
        self.log_format = log_format
        self.log_level = log_level
        self.stop_grace = STOP_GRACE
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self.store: QueueStore | None = None
        self.scheduler: Scheduler | None = None
        self.notifier = sdnotify.Notifier()

    async def serve(self) -> int:
        try:
            self.store = await QueueStore.open(self.cfg.queue.path)
        except (OSError, QueueError) as exc:
            # One line the operator can act on (often: the service user cannot reach the
            # directory), not a traceback.
            log.error("cannot open the queue %s as %s: %s", self.cfg.queue.path,
                      _user_name(), exc)
            return 1
        pid_file = Path(self.cfg.queue.path) / PID_NAME
        transport = Transport(self.cfg)
        self.scheduler = Scheduler(
            self.cfg, self.store, make_resolver(self.cfg), transport, log_format=self.log_format,
            metrics=self.metrics,
        )
        try:
            self._servers = await start_listeners(self.cfg, self.store, self.scheduler.wake)
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            await self.store.close()
            return 1
        pid_file.write_text(f"{os.getpid()}\n", encoding="ascii")
        self._install_signals()
        where = ", ".join(f"{x.address}:{x.port}" for x in self.cfg.listen)
        self._event(f"ready: listening on {where}, mode={self.cfg.routing.mode.value}")
        self.notifier.ready(f"listening on {where}")
        runner = asyncio.create_task(self.scheduler.run())
        reporter = asyncio.create_task(self._write_metrics_every(METRICS_EVERY))
        watchdog = asyncio.create_task(self._ping_watchdog(self.notifier.watchdog_interval))
        await self._stop.wait()
        self.notifier.stopping()
        reporter.cancel()
        watchdog.cancel()
        self._event("stopping: closing listeners, finishing in-flight deliveries")
        await self._close_servers()
        await self.scheduler.stop(self.stop_grace)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await transport.close()
        self._write_metrics()
        await self.store.close()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        self._event("stopped")
        return 0

    async def _write_metrics_every(self, seconds: float) -> None:
        while True:
            self._write_metrics()
            await asyncio.sleep(seconds)

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

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

    async def reload(self) -> bool:
        """Load, validate and apply the config; keep the running one when anything is wrong."""
        self.notifier.reloading()
        try:
            return await self._reload()
        finally:
            self.notifier.ready(f"running, mode={self.cfg.routing.mode.value}")

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
        if new.listen != old.listen and not await self._rebind(new, old):
            return False
        self.cfg = new
        assert self.scheduler is not None
        self.scheduler.update(new, make_resolver(new))
        self._event(f"reloaded: mode={new.routing.mode.value}")
        return True

    async def _rebind(self, new: Config, old: Config) -> bool:
        assert self.store is not None and self.scheduler is not None
        await self._close_servers()
        try:
            self._servers = await start_listeners(new, self.store, self.scheduler.wake)
            return True
        except OSError as exc:
            log.error("reload refused: cannot listen on the new addresses: %s", exc)
            self._servers = await start_listeners(old, self.store, self.scheduler.wake)
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
) -> int:
    configure_logging(log_format, log_level, sys.stderr)
    try:
        cfg = load_config(config_path, secrets_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    daemon = Daemon(config_path, secrets_path, cfg, log_format, log_level)
    daemon.stop_grace = stop_grace
    daemon._configure_logging(cfg)
    return eventloop.run(daemon.serve())
