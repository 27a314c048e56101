"""The link between an SMTP worker process and the daemon's one queue writer.

With ``limits.smtp_workers`` set, the SMTP sessions run in worker processes (so the listener
and the delivery side use different cores) while the queue keeps one writer, the daemon. Each
worker has one Unix stream socket to the daemon carrying frames: a 4-byte length and a pickle
(both ends are the same program, run by the same user, over a socketpair nobody else holds).

Worker → daemon:

- ``("admit", rid, client)``: may a new session from ``client`` start? The daemon's one
  ``InboundGate`` counts every worker's sessions against the running config's caps.
- ``("release", client)``: that session ended.
- ``("enqueue", rid, sender, recipients, fields, body)``: queue a message; ``body`` is the
  message when it fits one frame, else None and ``("chunk", rid, data)`` frames follow, then
  ``("end", rid)`` (or ``("abort", rid)`` when the session went away meanwhile). The daemon
  gathers a chunked body into its own ``BodySpool`` (bounded memory) and runs
  ``QueueStore.enqueue``, whose group commit batches every worker's messages.

Daemon → worker: ``("admitted", rid, reason_or_None)``, ``("queued", rid, queue_id)`` once the
COMMIT returned (the worker answers 250 only then: the durability rule is the in-process
one), ``("failed", rid, text)``, and ``("stop", grace)``. A worker whose link closes fails
every message it is still waiting for (the client gets 452 and keeps its copy).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from deliverd.queue.spool import BodySpool
from deliverd.queue.store import QueueError, QueueStore
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


class MessageQueue(Protocol):
    """Where the listener queues mail: the daemon's ``QueueStore``, or in an SMTP worker
    process the link to it (``deliverd.submission.handoff.QueueLink``)."""

    def spool(self) -> BodySpool: ...

    def free_bytes(self) -> int: ...

    async def enqueue(
        self, sender: str, recipients: list[str], data: bytes | BodySpool, *,
        smtputf8: bool, eightbit: bool, hold_reason: str | None, queue_id: str | None,
        ret: str | None, envid: str | None, notify: dict[str, str], orcpt: dict[str, str],
    ) -> str: ...


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
    """What a worker's listeners use for the queue (``spool``, ``free_bytes``, ``enqueue``,
    as ``QueueStore``) and for the session caps (``ask``, ``release``)."""

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

    async def enqueue(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes | BodySpool,
        **fields: Any,
    ) -> str:
        rid, answer = self._ask()
        body = data if isinstance(data, bytes) else None
        if body is None and isinstance(data, BodySpool) and data.size <= INLINE_BODY:
            body = data.getvalue()
        self._send(("enqueue", rid, sender, tuple(recipients), fields, body))
        if body is not None and len(body) > FLUSH_AT:
            self._out.flush()  # a large frame leaves now, and waits for room: bounded memory
            await self._writer.drain()
        if body is None:
            assert isinstance(data, BodySpool)
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
                    answer.set_exception(QueueError(str(message[2])))
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


async def serve_link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    store: QueueStore,
    gate: InboundGate,
    limits: Callable[[], tuple[int, int]],
    on_enqueued: Callable[[str], None],
    on_ready: Callable[[], None],
) -> None:
    """Serve one worker's link until it closes. Each message is queued in its own task, so
    every worker's messages meet in the store's group commit; the sessions this worker had
    open are released when its link closes (it exited, or died)."""
    open_sessions: Counter[str] = Counter()
    gathering: dict[int, tuple[BodySpool, str, tuple[str, ...], Mapping[str, Any]]] = {}
    tasks: set[asyncio.Task[None]] = set()

    out = _Corked(writer)

    def reply(message: tuple[Any, ...]) -> None:
        if not writer.is_closing():
            out.send(message)

    async def queue(
        rid: int, sender: str, rcpts: tuple[str, ...], body: bytes | BodySpool,
        fields: Mapping[str, Any],
    ) -> None:
        try:
            queue_id = await store.enqueue(sender, rcpts, body, **fields)
        except Exception as exc:  # disk full, I/O: the worker refuses with 452
            reply(("failed", rid, str(exc) or type(exc).__name__))
            return
        finally:
            if isinstance(body, BodySpool):
                body.close()
        try:
            on_enqueued(queue_id)
        except Exception:  # the scheduler's wake-up must never turn a queued message into an error
            log.exception("%s: on_enqueued callback failed", queue_id)
        reply(("queued", rid, queue_id))

    def start(*args: Any) -> None:
        task = asyncio.create_task(queue(*args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        while (message := await read_frame(reader)) is not None:
            kind = message[0]
            if kind == "enqueue":
                _, rid, sender, rcpts, fields, body = message
                if body is not None:
                    start(rid, sender, rcpts, body, fields)
                else:
                    gathering[rid] = (store.spool(), sender, rcpts, fields)
            elif kind == "chunk":
                gathering[message[1]][0].write(message[2])
            elif kind == "end":
                spool, sender, rcpts, fields = gathering.pop(message[1])
                start(message[1], sender, rcpts, spool, fields)
            elif kind == "abort":
                dropped = gathering.pop(message[1], None)
                if dropped is not None:
                    dropped[0].close()
            elif kind == "admit":
                _, rid, client = message
                max_sessions, max_per_client = limits()
                reason = gate.admit(client, max_sessions, max_per_client)
                if reason is None:
                    open_sessions[client] += 1
                elif gate.on_refused is not None:
                    gate.on_refused(reason)
                reply(("admitted", rid, reason))
            elif kind == "release":
                client = message[1]
                if open_sessions[client] > 0:
                    open_sessions[client] -= 1
                    gate.release(client)
            elif kind == "ready":
                on_ready()
            else:
                log.error("SMTP worker link: unknown frame %r", kind)
    finally:
        for spool, *_ in gathering.values():
            spool.close()
        for client, count in open_sessions.items():
            for _ in range(count):
                gate.release(client)
        if tasks:  # what was handed over is queued all the same; only the answer is lost
            await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()


def stop_frame(grace: float) -> bytes:
    return frame(("stop", grace))
