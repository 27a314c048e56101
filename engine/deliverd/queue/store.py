"""The queue for the asyncio daemon: ``QueueDB`` driven from threads, with group commit.

One writer thread owns the write connection. Writes from many coroutines (``enqueue`` from many
SMTP sessions, ``record`` from the scheduler) wait in one queue; the writer takes everything
waiting, runs it in one transaction and resolves each caller's future only after COMMIT
returned. While one commit is fsyncing the next batch accumulates, so the fsync rate stays flat
as load grows. Reads use a second connection on a second thread (WAL lets them run during a
write). Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from deliverd.queue.database import (
    ChunkedBody,
    QueueDB,
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    QueueFullError,
    QueueMissingError,
    RcptState,
    RecipientUpdate,
    StsRow,
    TlsResultKey,
    TlsResultRow,
    is_queue_id,
    new_queue_id,
)
from deliverd.queue.message import NewMessage
from deliverd.queue.spool import BODY_CHUNK, BodySpool

__all__ = [
    "BODY_CHUNK",
    "BodySpool",
    "ChunkedBody",
    "NewMessage",
    "QueueDB",
    "QueueError",
    "QueueFullError",
    "QueueMissingError",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
    "RcptState",
    "RecipientUpdate",
    "is_queue_id",
    "new_queue_id",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Upper bound on operations per transaction, so one huge burst still commits in pieces and
# the first callers are not kept waiting behind the last.
MAX_BATCH = 512


@dataclass
class _Job(Generic[T]):
    op: Callable[[QueueDB], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[T], result: T | BaseException) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _settle_all(settled: list[tuple[asyncio.Future[object], object]]) -> None:
    for future, result in settled:
        _settle(future, result)


class _Writer(threading.Thread):
    """The only thread that writes; batches whatever is waiting into one transaction."""

    def __init__(self, db: QueueDB) -> None:
        super().__init__(name="deliverd-queue-writer", daemon=True)
        self.db = db
        self._jobs: queue.SimpleQueue[_Job[object] | None] = queue.SimpleQueue()

    def submit(self, op: Callable[[QueueDB], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(op, future, loop))  # type: ignore[arg-type]
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
        self.db.close()

    def _run_batch(self, batch: list[_Job[object]]) -> None:
        results: list[object | BaseException] = []
        try:
            with self.db.batch():
                for job in batch:
                    try:
                        results.append(job.op(self.db))
                    except Exception as exc:  # one bad operation fails only its caller
                        results.append(exc)
        except Exception as exc:  # the COMMIT itself failed: nothing of the batch is stored
            log.error("queue commit failed for %d operations: %s", len(batch), exc)
            failure = exc if isinstance(exc, QueueError) else QueueFullError(str(exc))
            results = [failure] * len(batch)
        # One wake-up per event loop for the whole batch, not one per job: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[object], object]]] = {}
        for job, result in zip(batch, results, strict=True):
            by_loop.setdefault(job.loop, []).append((job.future, result))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)


def _remove_settled(db: QueueDB) -> int:
    """Remove messages whose recipients are all delivered or bounced; how many.

    The scheduler records an attempt and removes the finished message in two writes; a crash
    between them leaves a message that ``due()`` never returns again, so it would sit in the
    queue forever. Start-up is the one moment nothing else is delivering: finish them here.
    """
    settled = db.settled()
    if settled:
        with db.batch():
            for queue_id in settled:
                db.finish(queue_id)
        log.info("removed %d finished messages left behind by an interrupted run",
                 len(settled))
    return len(settled)


class QueueStore:
    """The async queue the daemon uses; see ``deliverd.queue.database.QueueDB`` for semantics."""

    def __init__(self, writer: _Writer, reader: QueueDB) -> None:
        self._writer = writer
        self._reader = reader
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deliverd-queue-rd")
        self._closed = False

    @property
    def path(self) -> Path:
        return self._reader.path

    def free_bytes(self) -> int:
        """Space left for unprivileged writers on the queue's filesystem."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit makes this << writes)."""
        return self._writer.db.commits

    @classmethod
    async def open(cls, path: str | Path) -> QueueStore:
        """Open (creating the directory with mode 0700 and the database if needed)."""
        write_db = await asyncio.to_thread(QueueDB.open, path)
        try:
            read_db = await asyncio.to_thread(QueueDB.open, path)
        except BaseException:
            write_db.close()
            raise
        try:
            await asyncio.to_thread(_remove_settled, write_db)
        except BaseException:
            write_db.close()
            read_db.close()
            raise
        writer = _Writer(write_db)
        writer.start()
        return cls(writer, read_db)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Queued writes run before the stop marker: nothing acknowledged-to-be is dropped.
        self._writer.stop()
        await asyncio.to_thread(self._writer.join)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._read_pool, self._reader.close)
        self._read_pool.shutdown(wait=True)

    async def _write(self, op: Callable[[QueueDB], T]) -> T:
        if self._closed:
            raise QueueError("queue store is closed")
        return await self._writer.submit(op)

    async def _read(self, op: Callable[[QueueDB], T]) -> T:
        if self._closed:
            raise QueueError("queue store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, op, self._reader)

    # -- writes -------------------------------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> str:
        """Queue a message; returns its id once the transaction holding it has committed.

        Raises ``QueueFullError`` (disk full, I/O error) with nothing of the message stored.
        A ``BodySpool`` body (see ``spool()``) is read by the writer thread, chunk by chunk;
        the caller must not touch it until this returns.
        """
        arrival = time.time()
        return await self._write(lambda db: db.enqueue(message, now=arrival))

    def spool(self) -> BodySpool:
        """An empty spool for a body arriving in pieces (its overflow file in the queue's
        directory, so it is on the filesystem the free-space checks watch)."""
        return BodySpool(self.path)

    async def record(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> None:
        """Store an attempt's outcome durably; attempts of each updated recipient grow by 1."""
        ups = tuple(updates)
        await self._write(lambda db: db.record(queue_id, ups))

    async def mark_delay_notified(self, queue_id: str) -> None:
        await self._write(lambda db: db.mark_delay_notified(queue_id))

    async def settle(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> bool:
        """``record`` and ``finish`` as one write: True if the message was removed."""
        ups = tuple(updates)
        return await self._write(lambda db: db.settle(queue_id, ups))

    async def finish(self, queue_id: str) -> bool:
        """Remove the message if every recipient is final (delivered/bounced)."""
        return await self._write(lambda db: db.finish(queue_id))

    async def flush(self) -> int:
        """Make every deferred recipient due now; how many changed."""
        return await self._write(lambda db: db.flush())

    async def hold(self, queue_id: str, reason: str = "operator") -> bool:
        return await self._write(lambda db: db.hold(queue_id, reason))

    async def release(self, queue_id: str) -> bool:
        """Clear the hold; held recipients become deferred and due now."""
        return await self._write(lambda db: db.release(queue_id))

    async def delete(self, queue_id: str) -> bool:
        """Operator delete: no DSN."""
        return await self._write(lambda db: db.delete(queue_id))

    # -- reads --------------------------------------------------------------------------------

    async def due(
        self, now: float, limit: int = 1000, *, exclude: Collection[str] = ()
    ) -> list[QueuedMessage]:
        """Not-held messages with a recipient pending, or deferred with next_attempt <= now;
        ids in ``exclude`` are skipped."""
        return await self._read(lambda db: db.due(now, limit, exclude=exclude))

    async def due_with_data(
        self, now: float, limit: int, *, exclude: Collection[str] = ()
    ) -> list[tuple[QueuedMessage, bytes | ChunkedBody]]:
        """``due`` and the bodies of what it found, in one trip to the reader thread (the
        scheduler's dispatch: one read per batch of messages instead of one per message).
        A body stored in chunks comes as a ``ChunkedBody``: read it with ``body_chunks``."""

        def op(db: QueueDB) -> list[tuple[QueuedMessage, bytes | ChunkedBody]]:
            messages = db.due(now, limit, exclude=exclude)
            bodies = db.read_dispatch([m.queue_id for m in messages])
            return [(m, bodies[m.queue_id]) for m in messages if m.queue_id in bodies]

        return await self._read(op)

    async def next_wakeup(self) -> float | None:
        """Earliest next_attempt among deferred recipients."""
        return await self._read(lambda db: db.next_wakeup())

    async def read_data(self, queue_id: str) -> bytes:
        """The message; KeyError when it is not queued."""
        return await self._read(lambda db: db.read_data(queue_id))

    async def body_chunks(self, queue_id: str) -> AsyncIterator[bytes]:
        """The message in chunks of at most ``BODY_CHUNK`` bytes, each read on the reader
        thread when asked for: the way to read a body of any size. KeyError when it is not
        queued."""
        chunks = self._reader.iter_body(queue_id)
        while (chunk := await self._read(lambda _db: next(chunks, None))) is not None:
            yield chunk

    async def get(self, queue_id: str) -> QueuedMessage | None:
        return await self._read(lambda db: db.get(queue_id))

    async def sts_policy(self, domain: str) -> StsRow | None:
        return await self._read(lambda db: db.sts_policies.get(domain))

    async def store_sts_policy(self, domain: str, row: StsRow) -> None:
        await self._write(lambda db: db.sts_policies.store(domain, row))

    async def count_tls_result(self, key: TlsResultKey, policy: str) -> None:
        await self._write(lambda db: db.tls_results.count(key, policy))

    async def tls_result_days(self, before: str) -> list[tuple[str, str]]:
        return await self._read(lambda db: db.tls_results.days(before))

    async def tls_results(self, domain: str, day: str) -> list[TlsResultRow]:
        return await self._read(lambda db: db.tls_results.results(domain, day))

    async def forget_tls_results(self, domain: str, day: str) -> None:
        await self._write(lambda db: db.tls_results.forget(domain, day))

    async def list_messages(self) -> list[QueuedMessage]:
        return await self._read(lambda db: db.list_messages())
