"""The link between an SMTP worker process and the daemon's one queue writer.

With ``limits.smtp_workers`` set, the SMTP sessions run in worker processes (so the listener
and the delivery side use different cores) while the queue keeps one writer, the daemon. Each
worker has one Unix stream socket to the daemon carrying frames: a 4-byte length and a pickle
(both ends are the same program, run by the same user, over a socketpair nobody else holds).

Worker → daemon:

- ``("admit", rid, client)``: may a new session from ``client`` start? The daemon's one
  ``InboundGate`` counts every worker's sessions against the running config's caps.
- ``("release", client)``: that session ended.
- ``("enqueue", rid, arrival, body)``: a message for the way in (``cleanup.Arrival``); ``body``
  is its content when it fits one frame, else None and ``("chunk", rid, data)`` frames follow,
  then ``("end", rid)`` (or ``("abort", rid)`` when the session went away meanwhile). The
  daemon gathers a chunked body into its own ``BodySpool`` (bounded memory) and hands it to its
  ``Intake.admit``, the one way into the queue, whose group commit batches every worker's
  messages.
- ``("ready",)``: the worker listens.

Daemon → worker: ``("admitted", rid, reason_or_None)``, ``("queued", rid, queue_id)`` once the
COMMIT returned (the worker answers 250 only then: the durability rule is the in-process
one), ``("failed", rid, text, dkim)`` (``dkim``: a DKIM key could not be read, which the worker
answers 451 rather than 452), and ``("stop", grace)``. A worker whose link closes fails
every message it is still waiting for (the client gets 452 and keeps its copy).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deliverd.dkim.keys import DkimKeyError
from deliverd.queue.spool import BodySpool
from deliverd.queue.store import QueueError
from deliverd.submission.cleanup import Arrival, Intake
from deliverd.submission.gate import InboundGate

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
# A body up to this size travels in the ``enqueue`` frame itself; a larger one in chunks.
INLINE_BODY = 256 * 1024
CHUNK = 256 * 1024
# A frame larger than this is written at once and drained, not corked with the others.
FLUSH_AT = 64 * 1024


def frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next frame; None at the end of the stream (the other side went away)."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(head)
        message = pickle.loads(await reader.readexactly(size))  # noqa: S301 (our own peer)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    assert isinstance(message, tuple)
    return message


class AskingGate(Protocol):
    """The session caps counted elsewhere (by the daemon, for an SMTP worker): asked once a
    connection's handler runs, before its greeting."""

    async def ask(self, client: str) -> str | None: ...

    def release(self, client: str) -> None: ...


class _Corked:
    """Frames sent during one event loop turn go out in one write at its end: a group commit
    answers many messages at once, and one ``send`` each would be a system call each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._parts: list[bytes] = []
        self._scheduled = False

    def send(self, message: tuple[Any, ...]) -> None:
        self._parts.append(frame(message))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._parts and not self.writer.is_closing():
            self.writer.write(b"".join(self._parts))
        self._parts.clear()


class LinkClosed(QueueError):
    """The daemon's end of the link is gone: nothing more can be queued from here."""


# ---------------------------------------------------------------------------------------------
# The worker's end


class QueueLink:
    """What a worker's listeners use as the way in (``spool``, ``free_bytes``, ``admit``, as
    the daemon's ``Intake``) and for the session caps (``ask``, ``release``)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queue_path: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._out = _Corked(writer)
        self.path = queue_path
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.sessions = 0  # admitted here and not yet released
        self._idle = asyncio.Event()
        self._idle.set()
        self.stop_requested: asyncio.Future[float | None] = (
            asyncio.get_running_loop().create_future()
        )

    # -- the queue ----------------------------------------------------------------------------

    def spool(self) -> BodySpool:
        return BodySpool(self.path)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    async def admit(self, arrival: Arrival, data: BodySpool) -> str:
        rid, answer = self._ask()
        body = data.getvalue() if data.size <= INLINE_BODY else None
        self._send(("enqueue", rid, arrival, body))
        if body is not None and len(body) > FLUSH_AT:
            self._out.flush()  # a large frame leaves now, and waits for room: bounded memory
            await self._writer.drain()
        if body is None:
            try:
                for chunk in data.chunks(CHUNK):
                    self._send(("chunk", rid, chunk))
                    self._out.flush()
                    await self._writer.drain()
            except BaseException:  # the session went away mid-way: the daemon drops the part
                self._waiting.pop(rid, None)
                self._send(("abort", rid))
                raise
            self._send(("end", rid))
        result = await answer
        assert isinstance(result, str)
        return result

    # -- the session caps ---------------------------------------------------------------------

    async def ask(self, client: str) -> str | None:
        """None when the daemon admits a session from ``client``, else the cap reached."""
        rid, answer = self._ask()
        self._send(("admit", rid, client))
        try:
            reason = await asyncio.shield(answer)
        except asyncio.CancelledError:
            # The client went away while we asked: if the daemon counted it, uncount it.
            answer.add_done_callback(lambda done: self._late_admission(done, client))
            raise
        if reason is None:
            self.sessions += 1
            self._idle.clear()
        return reason if reason is None else str(reason)

    def _late_admission(self, answer: asyncio.Future[Any], client: str) -> None:
        if not answer.cancelled() and answer.exception() is None and answer.result() is None:
            self._send(("release", client))

    def release(self, client: str) -> None:
        self.sessions -= 1
        if self.sessions == 0:
            self._idle.set()
        self._send(("release", client))

    async def idle(self) -> None:
        """Return once no session admitted here is open."""
        await self._idle.wait()

    # -- the link -----------------------------------------------------------------------------

    def _ask(self) -> tuple[int, asyncio.Future[Any]]:
        if self._writer.is_closing():
            raise LinkClosed("the daemon's queue link is closed")
        self._next += 1
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = answer
        return self._next, answer

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self._writer.is_closing():
            self._out.send(message)

    def send_ready(self) -> None:
        self._send(("ready",))

    async def run(self) -> None:
        """Read the daemon's answers until the link closes; then fail whatever waits."""
        try:
            while (message := await read_frame(self._reader)) is not None:
                kind = message[0]
                if kind == "stop":
                    if not self.stop_requested.done():
                        self.stop_requested.set_result(float(message[1]))
                    continue
                answer = self._waiting.pop(message[1], None)
                if answer is None or answer.done():
                    continue
                if kind == "failed":
                    failure = DkimKeyError if message[3] else QueueError
                    answer.set_exception(failure(str(message[2])))
                else:  # "queued" (a queue id) or "admitted" (None or the cap reached)
                    answer.set_result(message[2])
        finally:
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(LinkClosed("the daemon's queue link closed"))
            self._waiting.clear()
            if not self.stop_requested.done():
                self.stop_requested.set_result(None)  # None: no grace, the daemon is gone
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# The daemon's end


@dataclass
class _LinkServer:
    """The daemon's end of one worker's link: one method per frame kind (``frame_<kind>``)."""

    intake: Intake
    gate: InboundGate
    limits: Callable[[], tuple[int, int]]
    on_ready: Callable[[], None]
    out: _Corked
    open_sessions: Counter[str] = field(default_factory=Counter)
    gathering: dict[int, tuple[Arrival, BodySpool]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def reply(self, message: tuple[Any, ...]) -> None:
        if not self.out.writer.is_closing():
            self.out.send(message)

    def dispatch(self, message: tuple[Any, ...]) -> None:
        handler = getattr(self, f"frame_{message[0]}", None)
        if handler is None:
            log.error("SMTP worker link: unknown frame %r", message[0])
            return
        handler(*message[1:])

    # -- a message for the way in ------------------------------------------------------------

    def frame_enqueue(self, rid: int, arrival: Arrival, body: bytes | None) -> None:
        spool = self.intake.spool()
        if body is None:
            self.gathering[rid] = (arrival, spool)
            return
        spool.write(body)
        self._admit(rid, arrival, spool)

    def frame_chunk(self, rid: int, data: bytes) -> None:
        self.gathering[rid][1].write(data)

    def frame_end(self, rid: int) -> None:
        arrival, spool = self.gathering.pop(rid)
        self._admit(rid, arrival, spool)

    def frame_abort(self, rid: int) -> None:
        dropped = self.gathering.pop(rid, None)
        if dropped is not None:
            dropped[1].close()

    def _admit(self, rid: int, arrival: Arrival, spool: BodySpool) -> None:
        task = asyncio.create_task(self._queue(rid, arrival, spool))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _queue(self, rid: int, arrival: Arrival, spool: BodySpool) -> None:
        try:
            queue_id = await self.intake.admit(arrival, spool)
        except Exception as exc:  # disk full, I/O, a key: the worker refuses (452, 451)
            dkim = isinstance(exc, DkimKeyError)
            self.reply(("failed", rid, str(exc) or type(exc).__name__, dkim))
            return
        finally:
            spool.close()
        self.reply(("queued", rid, queue_id))

    # -- the session caps, and the worker's state ---------------------------------------------

    def frame_admit(self, rid: int, client: str) -> None:
        max_sessions, max_per_client = self.limits()
        reason = self.gate.admit(client, max_sessions, max_per_client)
        if reason is None:
            self.open_sessions[client] += 1
        elif self.gate.on_refused is not None:
            self.gate.on_refused(reason)
        self.reply(("admitted", rid, reason))

    def frame_release(self, client: str) -> None:
        if self.open_sessions[client] > 0:
            self.open_sessions[client] -= 1
            self.gate.release(client)

    def frame_ready(self) -> None:
        self.on_ready()

    async def close(self) -> None:
        for _arrival, spool in self.gathering.values():
            spool.close()
        for client, count in self.open_sessions.items():
            for _ in range(count):
                self.gate.release(client)
        if self.tasks:  # what was handed over is queued all the same; only the answer is lost
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    intake: Intake,
    gate: InboundGate,
    limits: Callable[[], tuple[int, int]],
    on_ready: Callable[[], None],
) -> None:
    """Serve one worker's link until it closes. Each message goes to ``intake`` in its own
    task, so every worker's messages meet in the store's group commit; the sessions this
    worker had open are released when its link closes (it exited, or died)."""
    server = _LinkServer(intake, gate, limits, on_ready, _Corked(writer))
    try:
        while (message := await read_frame(reader)) is not None:
            server.dispatch(message)
    finally:
        await server.close()
        writer.close()


def stop_frame(grace: float) -> bytes:
    return frame(("stop", grace))
