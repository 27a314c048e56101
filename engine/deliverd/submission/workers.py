"""The daemon's side of ``limits.smtp_workers``: worker processes that run the SMTP listeners.

The daemon binds every listener's socket (ports below 1024 come bound from before it gave up
root) and starts the workers, each a fresh interpreter (the daemon runs ``python -m
deliverd.worker``, never a fork of the threaded daemon) accepting on all of them: the kernel
hands each new connection to one worker. Every message a worker takes comes back over its
link (``deliverd.submission.handoff``) to the daemon's ``QueueStore``: one queue writer, one
group commit, 250 only after it. The daemon's ``InboundGate`` counts every worker's sessions.

A worker that dies is started again (its sessions are released; a client in the middle of DATA
got no 250 and keeps its message). A reload starts a new set of workers with the new config
and asks the old ones to stop: they stop accepting at once and finish their open sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence

from deliverd.config.model import Config
from deliverd.submission.cleanup import Intake
from deliverd.submission.gate import InboundGate
from deliverd.submission.handoff import frame, serve_link, stop_frame
from deliverd.submission.sockets import bind_listeners

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
RESTART_DELAY = 1.0


class WorkerError(OSError):
    """A worker could not be started (it exited, or did not say ready in time)."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        self.process = process
        self.ready = ready
        self.writer: asyncio.StreamWriter | None = None
        self.link: asyncio.Task[None] | None = None
        self.retired = False

    @property
    def pid(self) -> int:
        return self.process.pid


class SmtpWorkers:
    """``count`` SMTP worker processes on ``cfg.listen``; see the module's docstring."""

    def __init__(
        self,
        intake: Intake,
        gate: InboundGate,
        current: Callable[[], Config],
        log_settings: tuple[str, str],
        command: Sequence[str],
        prebound: Mapping[tuple[str, int], socket.socket] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.on_exit = on_exit  # a worker ended unexpectedly (it is started again)
        self.command = tuple(command)  # a worker's program; its link's descriptor is appended
        self.intake = intake
        self.gate = gate
        self.current = current
        self.log_settings = log_settings
        self.prebound = prebound or {}
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.workers: list[_Worker] = []
        self._stopping = False
        self._restarts: set[asyncio.Task[None]] = set()

    def _limits(self) -> tuple[int, int]:
        running = self.current().limits
        return running.max_inbound_sessions, running.max_inbound_per_client

    async def start(self, cfg: Config) -> None:
        """Bind ``cfg.listen`` and start ``cfg.limits.smtp_workers`` workers on it; OSError
        (nothing left running) when a socket cannot be bound or a worker does not start."""
        self.sockets = bind_listeners(cfg.listen, self.prebound)
        try:
            self.workers = await self._spawn_all(cfg, self.sockets)
        except BaseException:
            self._close_sockets(self.sockets)
            self.sockets = {}
            raise

    async def replace(self, new: Config) -> None:
        """A reload: new workers (and sockets, where ``listen`` changed) with ``new``, then the
        old workers stop accepting and finish their sessions. OSError leaves the old ones."""
        keep = {(x.address, x.port) for x in new.listen}
        reused = {key: sock for key, sock in self.sockets.items() if key in keep}
        fresh = bind_listeners([x for x in new.listen if (x.address, x.port) not in reused],
                               self.prebound)
        sockets = {**reused, **fresh}
        try:
            workers = await self._spawn_all(new, sockets)
        except BaseException:
            self._close_sockets(fresh)
            raise
        old, self.workers = self.workers, workers
        dropped = {key: sock for key, sock in self.sockets.items() if key not in keep}
        self.sockets = sockets
        for worker in old:
            self._retire(worker, new.timeouts.command)
        self._close_sockets(dropped)

    async def stop(self, grace: float) -> None:
        """Stop accepting now; open sessions get ``grace`` seconds, then the workers end."""
        self._stopping = True
        for task in self._restarts:
            task.cancel()
        for worker in self.workers:
            self._retire(worker, grace)
        await asyncio.gather(*(self._reap(w, grace + 5.0) for w in self.workers))
        self.workers = []
        self._close_sockets(self.sockets)
        self.sockets = {}

    # -- one worker ---------------------------------------------------------------------------

    async def _spawn_all(
        self, cfg: Config, sockets: Mapping[tuple[str, int], socket.socket]
    ) -> list[_Worker]:
        started: list[_Worker] = []
        try:
            for _ in range(cfg.limits.smtp_workers):
                started.append(await self._spawn(cfg, sockets))
        except BaseException:
            for worker in started:
                self._retire(worker, 0.0)
            raise
        return started

    async def _spawn(
        self, cfg: Config, sockets: Mapping[tuple[str, int], socket.socket]
    ) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {key: sock.fileno() for key, sock in sockets.items()}
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(), *fds.values()),
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        worker = _Worker(process, loop.create_future())
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker.writer = writer
        writer.write(frame(("start", cfg, *self.log_settings, fds)))

        def on_ready() -> None:
            if not worker.ready.done():
                worker.ready.set_result(None)

        worker.link = asyncio.create_task(self._serve(worker, reader, writer, on_ready))
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT)
        except (TimeoutError, WorkerError) as exc:
            self._retire(worker, 0.0)
            raise WorkerError(f"SMTP worker {worker.pid} did not start: {exc}") from exc
        log.info("SMTP worker %d accepting", worker.pid)
        return worker

    async def _serve(
        self, worker: _Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        on_ready: Callable[[], None],
    ) -> None:
        try:
            await serve_link(reader, writer, self.intake, self.gate, self._limits, on_ready)
        finally:
            if not worker.ready.done():
                worker.ready.set_exception(WorkerError("it exited"))
            code = await worker.process.wait()
            if not worker.retired and not self._stopping:
                log.error("SMTP worker %d exited (%s); starting another", worker.pid, code)
                if self.on_exit is not None:
                    self.on_exit()
                task = asyncio.create_task(self._restart(worker))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def _restart(self, dead: _Worker) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            if dead not in self.workers:
                return
            try:
                worker = await self._spawn(self.current(), self.sockets)
            except OSError as exc:
                log.error("cannot start an SMTP worker: %s", exc)
                continue
            self.workers[self.workers.index(dead)] = worker
            return

    def _retire(self, worker: _Worker, grace: float) -> None:
        """Ask the worker to stop accepting and end within ``grace`` (then it is killed)."""
        if worker.retired:
            return
        worker.retired = True
        if worker.writer is not None and not worker.writer.is_closing():
            worker.writer.write(stop_frame(grace))
        task = asyncio.create_task(self._reap(worker, grace + 5.0))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    @staticmethod
    async def _reap(worker: _Worker, within: float) -> None:
        try:
            await asyncio.wait_for(worker.process.wait(), within)
        except TimeoutError:
            log.warning("SMTP worker %d did not stop in %.0f s: killing it", worker.pid, within)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.process.wait()
        if worker.link is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.link

    @staticmethod
    def _close_sockets(sockets: Mapping[tuple[str, int], socket.socket]) -> None:
        for sock in sockets.values():
            sock.close()
