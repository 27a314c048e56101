"""The durable queue as one SQLite database: envelopes, per-recipient state and bodies.

One committed transaction is the durability point: the database runs in WAL mode with
``synchronous=FULL``, so COMMIT returns only after the WAL is fsynced, and the body lives in the
same database as its envelope, so a message is either wholly queued or not at all.

``QueueDB`` is synchronous and owns one connection; it is what the CLI uses directly, and what
the async ``deliverd.queue.store.QueueStore`` drives from its writer and reader threads. Several
write operations can share one transaction (``batch``, from ``transactions.py``): that is the
group commit. The tables and their migration are in ``schema.py``, the records read from them
in ``records.py``; the MTA-STS policy cache (``sts_policies``) and the TLS-RPT counts
(``tls_results``) share the connection and its transactions from their own modules.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from deliverd.queue.listing import QueueListing
from deliverd.queue.message import NewMessage
from deliverd.queue.queue_ids import derived_queue_id, is_queue_id, new_queue_id
from deliverd.queue.records import (
    HEAD_SIZE,
    MSG_COLS,
    RCPT_COLS,
    ChunkedBody,
    MsgRow,
    QueueDepth,
    QueuedMessage,
    QueuedRecipient,
    RcptState,
    RecipientUpdate,
    message_from_row,
    recipient_from_row,
)
from deliverd.queue.schema import DB_NAME, SCHEMA_VERSION, prepare
from deliverd.queue.spool import BODY_CHUNK, BodySpool
from deliverd.queue.sts_cache import StsPolicyCache, StsRow
from deliverd.queue.tls_counts import TlsResultCounts, TlsResultKey, TlsResultRow
from deliverd.queue.transactions import QueueError, QueueFullError, QueueMissingError, translate

# The names other modules import from here, wherever they are defined now.
__all__ = [
    "DB_NAME", "HEAD_SIZE", "SCHEMA_VERSION", "ChunkedBody", "QueueDB", "QueueDepth",
    "QueueError", "QueueFullError", "QueueMissingError", "QueuedMessage", "QueuedRecipient",
    "RcptState", "RecipientUpdate", "StsRow", "TlsResultKey", "TlsResultRow",
    "derived_queue_id", "is_queue_id", "new_queue_id",
]

_MSG_COLS = MSG_COLS  # the name enqueue's statement uses
# SQLite limits host parameters per statement; fetch messages by id in chunks below it.
# (Every f-string query below interpolates only these constant column lists or "?" marks.)
_ID_CHUNK = 500


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


class QueueDB(QueueListing):
    """One connection to the queue database; every public method is one transaction.

    Not thread-safe by itself: one thread at a time (the async store gives each connection its
    own single thread).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__(conn, path)
        self.sts_policies = StsPolicyCache(self)
        self.tls_results = TlsResultCounts(self)

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> QueueDB:
        """Open the queue in directory ``path``; create it (mode 0700) unless ``create=False``."""
        qdir = Path(path)
        db_file = qdir / DB_NAME
        if not create and not db_file.exists():
            raise QueueMissingError(f"no queue database in {qdir}")
        new_dir = not qdir.exists()
        if new_dir:
            qdir.mkdir(mode=0o700, parents=True)
            _fsync_dir(qdir.parent)
        new_db = not db_file.exists()
        try:
            conn = sqlite3.connect(
                db_file, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        try:
            db = cls(conn, qdir)
            prepare(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise translate(exc) from exc
        if new_db:
            os.chmod(db_file, 0o600)
        # The database and its WAL exist now; make their directory entries durable too.
        _fsync_dir(qdir)
        return db

    def __enter__(self) -> QueueDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------

    def enqueue(self, message: NewMessage, *, now: float | None = None) -> str:
        """Store a message; durable when it returns (or when the enclosing batch commits).

        Should ``message.queue_id`` already exist, a fresh one is used instead (the returned
        one). A body larger than ``BODY_CHUNK`` goes into ``body_chunks`` one chunk at a time
        (from the spool, or cut from the bytes), inside the same transaction, so it is always
        read back in chunks. ``now`` is the arrival time (tests set it).
        """
        data, sender, queue_id = message.body, message.sender, message.queue_id
        smtputf8, eightbit, is_dsn = message.smtputf8, message.eightbit, message.is_dsn
        hold_reason, ret, envid = message.hold_reason, message.ret, message.envid
        small: bytes | None = None
        if isinstance(data, bytes):
            size = len(data)
            if size <= BODY_CHUNK:
                small = data
        else:
            size = data.size
            if data.in_memory:
                small = data.getvalue()
        rcpts = _unique(message.recipients)
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        arrival = time.time() if now is None else now
        held = hold_reason is not None
        notes, origs = message.notify, message.orcpt
        state = RcptState.HELD if held else RcptState.PENDING

        def op(c: sqlite3.Connection) -> str:
            qid = queue_id or new_queue_id(arrival)
            while True:
                try:
                    c.execute(
                        f"INSERT INTO messages ({_MSG_COLS}) VALUES (?,?,?,?,?,?,?,?,?,0,?,?)",  # noqa: S608
                        (qid, sender, arrival, size, smtputf8, eightbit, is_dsn, held,
                         hold_reason, ret, envid),
                    )
                    break
                except sqlite3.IntegrityError:
                    qid = new_queue_id(arrival)
            if small is not None:
                c.execute("INSERT INTO bodies (queue_id, data) VALUES (?, ?)", (qid, small))
            else:
                chunks = data.chunks() if isinstance(data, BodySpool) else (
                    data[i:i + BODY_CHUNK] for i in range(0, len(data), BODY_CHUNK))
                for seq, chunk in enumerate(chunks):
                    c.execute("INSERT INTO body_chunks (queue_id, seq, data) VALUES (?, ?, ?)",
                              (qid, seq, chunk))
            c.executemany(
                "INSERT INTO recipients (queue_id, idx, address, state, dsn_notify, dsn_orcpt)"
                " VALUES (?,?,?,?,?,?)",
                [(qid, i, addr, state.value, notes.get(addr), origs.get(addr))
                 for i, addr in enumerate(rcpts)],
            )
            return qid

        return self._write(op)

    def record(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> None:
        """Store the outcome of an attempt; each updated recipient's attempts grow by one.

        Unknown ids or addresses are ignored: the operator may have deleted the message while
        it was being delivered.
        """

        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE recipients SET state = ?, next_attempt = ?, attempts = attempts + 1,"
                " last_status = COALESCE(?, last_status),"
                " last_diagnostic = COALESCE(?, last_diagnostic),"
                " last_relay = COALESCE(?, last_relay)"
                " WHERE queue_id = ? AND address = ?",
                [
                    (u.state.value, u.next_attempt, u.status, u.diagnostic, u.relay,
                     queue_id, u.address)
                    for u in updates
                ],
            )

        self._write(op)

    def mark_delay_notified(self, queue_id: str) -> None:
        self._write(
            lambda c: c.execute(
                "UPDATE messages SET delay_notified = 1 WHERE queue_id = ?", (queue_id,)
            )
        )

    def finish(self, queue_id: str) -> bool:
        """Remove the message if every recipient is delivered or bounced; True if removed."""

        def op(c: sqlite3.Connection) -> bool:
            open_rcpt = c.execute(
                "SELECT 1 FROM recipients WHERE queue_id = ? AND state NOT IN (?, ?) LIMIT 1",
                (queue_id, RcptState.DELIVERED.value, RcptState.BOUNCED.value),
            ).fetchone()
            if open_rcpt is not None:
                return False
            return _delete(c, queue_id)

        return self._write(op)

    def settle(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> bool:
        """``record`` then ``finish`` in one operation: an attempt's outcome and the removal
        of a completed message commit together (no crash window between them, one write job
        instead of two). True if the message was removed."""
        if not self._in_batch:
            with self.batch():
                return self.settle(queue_id, updates)
        self.record(queue_id, updates)
        return self.finish(queue_id)

    def flush(self, now: float | None = None) -> int:
        """Make every deferred recipient due now; the number of recipients changed."""
        at = time.time() if now is None else now
        return self._write(
            lambda c: c.execute(
                "UPDATE recipients SET next_attempt = ? WHERE state = ? AND next_attempt > ?",
                (at, RcptState.DEFERRED.value, at),
            ).rowcount
        )

    def hold(self, queue_id: str, reason: str = "operator") -> bool:
        """Hold the whole message: its open recipients become held. False if unknown."""

        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE messages SET held = 1, hold_reason = ? WHERE queue_id = ?",
                (reason, queue_id),
            )
            if cur.rowcount == 0:
                return False
            c.execute(
                "UPDATE recipients SET state = ? WHERE queue_id = ? AND state IN (?, ?)",
                (RcptState.HELD.value, queue_id, RcptState.PENDING.value,
                 RcptState.DEFERRED.value),
            )
            return True

        return self._write(op)

    def release(self, queue_id: str, now: float | None = None) -> bool:
        """Clear the hold; held recipients become deferred and due now. False if unknown."""
        at = time.time() if now is None else now

        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE messages SET held = 0, hold_reason = NULL WHERE queue_id = ?",
                (queue_id,),
            )
            if cur.rowcount == 0:
                return False
            c.execute(
                "UPDATE recipients SET state = ?, next_attempt = ?"
                " WHERE queue_id = ? AND state = ?",
                (RcptState.DEFERRED.value, at, queue_id, RcptState.HELD.value),
            )
            return True

        return self._write(op)

    def delete(self, queue_id: str) -> bool:
        """Operator delete, whatever the recipients' states (no DSN). False if unknown."""
        return self._write(lambda c: _delete(c, queue_id))

    # -- reads --------------------------------------------------------------------------------

    def get(self, queue_id: str) -> QueuedMessage | None:
        found = self._read(lambda c: _fetch(c, [queue_id]))
        return found[0] if found else None

    def read_data(self, queue_id: str) -> bytes:
        """The whole message body; KeyError if the message is not queued. A large body is
        better read with ``iter_body``, which holds one chunk at a time."""
        return b"".join(self.iter_body(queue_id))

    def iter_body(self, queue_id: str) -> Iterator[bytes]:
        """The message body in chunks of at most ``BODY_CHUNK`` bytes (one query each, so
        memory stays bounded whatever the size); KeyError (at the first chunk) if the message
        is not queued. The body of a queued message never changes; should the message be
        removed while it is read, the chunks stop with KeyError."""
        row = self._read(
            lambda c: c.execute(
                "SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)
            ).fetchone()
        )
        if row is not None:
            whole: bytes = row[0]
            for start in range(0, len(whole), BODY_CHUNK):
                yield whole[start:start + BODY_CHUNK]
            return
        if self.get(queue_id) is None:
            raise KeyError(queue_id)
        seq = 0
        while (chunk := self._read(_chunk_reader(queue_id, seq))) is not None:
            yield chunk
            seq += 1

    def read_many(self, queue_ids: Sequence[str]) -> dict[str, bytes]:
        """Bodies of the queued messages among ``queue_ids`` (one read for a whole dispatch),
        whole, whatever their size; the daemon uses ``read_dispatch``."""
        found = self.read_dispatch(queue_ids)
        return {qid: b"".join(self.iter_body(qid)) if isinstance(body, ChunkedBody) else body
                for qid, body in found.items()}

    def read_dispatch(self, queue_ids: Sequence[str]) -> dict[str, bytes | ChunkedBody]:
        """Like ``read_many``, but a body stored in chunks is not read: only its head."""

        def op(c: sqlite3.Connection) -> dict[str, bytes | ChunkedBody]:
            found: dict[str, bytes | ChunkedBody] = {}
            for start in range(0, len(queue_ids), _ID_CHUNK):
                chunk = list(queue_ids[start:start + _ID_CHUNK])
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT queue_id, data FROM bodies WHERE queue_id IN ({marks})"  # noqa: S608
                found.update(c.execute(sql, chunk))
            for qid in queue_ids:  # bodies larger than one chunk
                if qid not in found:
                    row = c.execute(
                        "SELECT substr(data, 1, ?) FROM body_chunks WHERE queue_id = ?"
                        " AND seq = 0", (HEAD_SIZE, qid)).fetchone()
                    if row is not None:
                        found[qid] = ChunkedBody(bytes(row[0]))
            return found

        return self._read(op)

    def due(
        self, now: float | None = None, limit: int = 1000, *, exclude: Collection[str] = ()
    ) -> list[QueuedMessage]:
        """Messages not held with a recipient pending, or deferred and due by ``now``.

        Never-tried messages come first (oldest first), then deferred ones by due time. Both
        walks stop as soon as ``limit`` messages are found. Ids in ``exclude`` (the scheduler's
        in-flight messages) are skipped during the walk, before any row of theirs is fetched.
        """
        at = time.time() if now is None else now

        def op(c: sqlite3.Connection) -> list[QueuedMessage]:
            ids: dict[str, None] = {}
            walks = (
                # Pending rows share next_attempt 0, so the index yields them in insertion
                # (arrival) order without a sort.
                ("SELECT queue_id FROM recipients WHERE state = ?", (RcptState.PENDING.value,)),
                ("SELECT queue_id FROM recipients WHERE state = ? AND next_attempt <= ?"
                 " ORDER BY next_attempt", (RcptState.DEFERRED.value, at)),
            )
            for sql, params in walks:
                for (qid,) in c.execute(sql, params):
                    if len(ids) >= limit:
                        break
                    if qid not in exclude:
                        ids[qid] = None
            return [m for m in _fetch(c, list(ids)) if not m.held]

        return self._read(op)

    def settled(self) -> list[str]:
        """Ids of messages whose recipients are all delivered or bounced.

        Walks the state index from the final states only (finished messages are normally
        removed at once, so these rows are few): never a read of the whole queue, which at a
        million queued messages would make every start-up slow and large.
        """
        final = (RcptState.DELIVERED.value, RcptState.BOUNCED.value)

        def op(c: sqlite3.Connection) -> list[str]:
            candidates = [
                qid for (qid,) in c.execute(
                    "SELECT DISTINCT queue_id FROM recipients WHERE state IN (?, ?)", final
                )
            ]
            return [
                qid for qid in candidates
                if c.execute(
                    "SELECT 1 FROM recipients WHERE queue_id = ? AND state NOT IN (?, ?)"
                    " LIMIT 1", (qid, *final),
                ).fetchone() is None
            ]

        return self._read(op)

    def next_wakeup(self) -> float | None:
        """The earliest next_attempt among deferred recipients, None when nothing is deferred."""
        row = self._read(
            lambda c: c.execute(
                "SELECT next_attempt FROM recipients WHERE state = ?"
                " ORDER BY next_attempt LIMIT 1",
                (RcptState.DEFERRED.value,),
            ).fetchone()
        )
        return None if row is None else float(row[0])


def _chunk_reader(queue_id: str, seq: int) -> Callable[[sqlite3.Connection], bytes | None]:
    def op(c: sqlite3.Connection) -> bytes | None:
        row = c.execute(
            "SELECT data FROM body_chunks WHERE queue_id = ? AND seq = ?", (queue_id, seq)
        ).fetchone()
        return None if row is None else bytes(row[0])

    return op


def _delete(c: sqlite3.Connection, queue_id: str) -> bool:
    # Explicit deletes rather than relying on ON DELETE CASCADE being enabled on every
    # connection that ever touched the file.
    c.execute("DELETE FROM recipients WHERE queue_id = ?", (queue_id,))
    c.execute("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
    c.execute("DELETE FROM body_chunks WHERE queue_id = ?", (queue_id,))
    return c.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,)).rowcount > 0


def _fetch(c: sqlite3.Connection, ids: Sequence[str]) -> list[QueuedMessage]:
    """The messages with these ids, in the order given (missing ones skipped)."""
    rows: dict[str, MsgRow] = {}
    rcpts: dict[str, list[QueuedRecipient]] = {}
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = list(ids[start:start + _ID_CHUNK])
        marks = ",".join("?" * len(chunk))
        for row in c.execute(
            f"SELECT {MSG_COLS} FROM messages WHERE queue_id IN ({marks})",  # noqa: S608
            chunk,
        ):
            rows[row[0]] = row
        for rrow in c.execute(
            f"SELECT {RCPT_COLS} FROM recipients WHERE queue_id IN ({marks})"  # noqa: S608
            " ORDER BY queue_id, idx",
            chunk,
        ):
            rcpts.setdefault(rrow[0], []).append(recipient_from_row(rrow))
    return [message_from_row(rows[i], rcpts.get(i, ())) for i in ids if i in rows]
