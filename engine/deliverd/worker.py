"""An SMTP worker process (``limits.smtp_workers``): the listeners, on sockets the daemon bound,
with the daemon's queue and session caps at the other end of a link.

Started by the daemon (``deliverd.submission.workers``) as ``python -m deliverd.worker FD``
where FD is its end of the link. The first frame brings the running config, the log
settings and the listening sockets' descriptors (inherited); the worker answers ``ready``
once it accepts on them. It stops accepting on SIGTERM or SIGINT (systemd signals the whole
unit) or on the daemon's ``stop``, lets its open sessions finish within the grace the daemon
gives, and exits; when the link closes (the daemon is gone) it exits at once, and a message
still in DATA gets no 250: its client keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

from deliverd.config.model import Config
from deliverd.ops import eventloop
from deliverd.ops.logline import configure_logging
from deliverd.submission.handoff import QueueLink, read_frame
from deliverd.submission.listener import start_listeners


async def serve(link_fd: int) -> int:
    sock = socket.socket(fileno=link_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    start = await read_frame(reader)
    if start is None or start[0] != "start":
        return 1
    _, cfg, log_format, log_level, fds = start
    assert isinstance(cfg, Config)
    configure_logging(log_format, log_level, sys.stderr, secrets=cfg.secrets())
    link = QueueLink(reader, writer, cfg.queue.path)
    reading = asyncio.create_task(link.run())
    prebound = {key: socket.socket(fileno=fd) for key, fd in fds.items()}
    loop = asyncio.get_running_loop()
    stop_accepting = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_accepting.set)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):  # the daemon's to act on
        loop.add_signal_handler(signum, lambda: None)
    servers = await start_listeners(cfg, link, current=lambda: cfg,
                                    prebound=prebound, gate=link)
    for bound in prebound.values():
        bound.close()  # the servers listen on duplicates
    link.send_ready()
    signalled: asyncio.Future[object] = asyncio.ensure_future(stop_accepting.wait())
    stop: asyncio.Future[object] = link.stop_requested  # type: ignore[assignment]
    await asyncio.wait({stop, signalled}, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    grace = link.stop_requested.result() if link.stop_requested.done() else None
    if grace is None and not reading.done():
        # Signalled: no new sessions; the open ones go on until the daemon says stop or goes.
        await link.stop_requested
        grace = link.stop_requested.result()
    idle: asyncio.Future[None] = asyncio.ensure_future(link.idle())
    if grace:
        await asyncio.wait({reading, idle}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    for task in (signalled, idle, reading):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0


def main() -> None:
    sys.exit(eventloop.run(serve(int(sys.argv[1]))))


if __name__ == "__main__":
    main()
