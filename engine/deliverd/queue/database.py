"""The durable queue as one SQLite database: envelopes, per-recipient state and bodies.

One committed transaction is the durability point: the database runs in WAL mode with
``synchronous=FULL``, so COMMIT returns only after the WAL is fsynced, and the body lives in the
same database as its envelope, so a message is either wholly queued or not at all.

``QueueDB`` is synchronous and owns one connection; it is what the CLI uses directly, and what
the async ``deliverd.queue.store.QueueStore`` drives from its writer and reader threads. Several
write operations can share one transaction (``batch``): that is the group commit.

This module is long because it is the whole on-disk format in one place: the table
definitions, their migration and every statement that reads or writes them, so a change to the
format is reviewed in one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from deliverd.queue.message import NewMessage
from deliverd.queue.spool import BODY_CHUNK, BodySpool

T = TypeVar("T")
_P = TypeVar("_P")

DB_NAME = "queue.db"
SCHEMA_VERSION = 4  # 2: mta_sts_policies, tls_results; 3: body_chunks (all IF NOT EXISTS);
# 4: RFC 3461 columns (messages.dsn_ret, dsn_envid; recipients.dsn_notify, dsn_orcpt), added
# by _MIGRATIONS to a queue made before them
BUSY_TIMEOUT_MS = 30_000
# SQLite limits host parameters per statement; fetch messages by id in chunks below it.
# (Every f-string query below interpolates only these constant column lists or "?" marks.)
_ID_CHUNK = 500


class RcptState(StrEnum):
    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    HELD = "held"

    @property
    def is_final(self) -> bool:
        return self in (RcptState.DELIVERED, RcptState.BOUNCED)


@dataclass(frozen=True)
class QueuedRecipient:
    address: str
    state: RcptState
    attempts: int
    next_attempt: float  # unix time
    last_status: str | None
    last_diagnostic: str | None
    last_relay: str | None
    notify: str | None = None  # RFC 3461 NOTIFY as given (NEVER or SUCCESS,FAILURE,DELAY)
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded: "rfc822;user@example.com"


@dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    sender: str
    arrival: float
    size: int
    recipients: tuple[QueuedRecipient, ...]
    smtputf8: bool
    eightbit: bool
    is_dsn: bool
    held: bool
    hold_reason: str | None
    delay_notified: bool
    ret: str | None = None  # RFC 3461 RET: FULL or HDRS
    envid: str | None = None  # RFC 3461 ENVID, decoded


@dataclass(frozen=True)
class RecipientUpdate:
    address: str
    state: RcptState
    next_attempt: float = 0.0
    status: str | None = None
    diagnostic: str | None = None
    relay: str | None = None


@dataclass(frozen=True)
class QueueDepth:
    recipients: dict[str, int]  # open state -> count
    messages: int
    oldest_arrival: float | None
    oldest_deferred_arrival: float | None


class QueueError(Exception):
    """The queue database failed in a way that is not the caller's fault."""


class QueueFullError(QueueError):
    """Disk full or an I/O error while writing: nothing of the operation was stored."""


class QueueMissingError(QueueError, FileNotFoundError):
    """``open(create=False)`` found no queue database."""


# Error names (sqlite3.Error.sqlite_errorname) that mean the storage itself failed.
_STORAGE_FAILURES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")


def _translate(exc: sqlite3.Error) -> QueueError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_STORAGE_FAILURES):
        return QueueFullError(f"queue storage failure: {name}: {exc}")
    return QueueError(f"queue database error: {name or type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Queue ids: time-ordered, unique, short (Postfix long-id style, Crockford base32 upper case).

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # ASCII-sorted, so ids sort by time
_TIME_CHARS = 9  # milliseconds: 45 bits, good until the year 3084
_RAND_CHARS = 4  # 20 bits: random start, incremented within one millisecond
_id_lock = threading.Lock()
_id_last = (0, 0)


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_queue_id(now: float | None = None) -> str:
    """A 13-character id: milliseconds since the epoch, then a per-process monotonic suffix.

    Within one process ids are strictly increasing; across processes (daemon and ``deliverd
    send``) a collision needs the same millisecond and the same 20 random bits, and the
    database's primary key catches even that.
    """
    global _id_last
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        last_ms, last_seq = _id_last
        if ms <= last_ms:
            ms, seq = last_ms, last_seq + 1
            if seq >= 1 << (5 * _RAND_CHARS):
                ms, seq = last_ms + 1, secrets.randbits(5 * _RAND_CHARS - 1)
        else:
            # Half the space, so the increments after it cannot overflow in practice.
            seq = secrets.randbits(5 * _RAND_CHARS - 1)
        _id_last = (ms, seq)
    return _b32(ms, _TIME_CHARS) + _b32(seq, _RAND_CHARS)


def derived_queue_id(ms: int, key: bytes) -> str:
    """The id of the message a given thing becomes, the same every time it is asked: ``ms``
    for the time part, 20 bits of ``key``'s hash for the rest. A producer that may be asked
    twice (the maildrop pickup after a crash) finds out whether it already queued it."""
    digest = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big")
    return _b32(ms, _TIME_CHARS) + _b32(digest >> (32 - 5 * _RAND_CHARS), _RAND_CHARS)


def is_queue_id(text: str) -> bool:
    return len(text) == _TIME_CHARS + _RAND_CHARS and all(c in _ALPHABET for c in text)


# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    arrival REAL NOT NULL,
    size INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    eightbit INTEGER NOT NULL DEFAULT 0,
    is_dsn INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    hold_reason TEXT,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    dsn_ret TEXT,
    dsn_envid TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bodies (
    queue_id TEXT PRIMARY KEY REFERENCES messages(queue_id) ON DELETE CASCADE,
    data BLOB NOT NULL
) WITHOUT ROWID;
-- Bodies larger than one chunk, in order (version 2): a message has its body either in
-- bodies (one row, as every version-1 queue holds them) or here, never in both.
CREATE TABLE IF NOT EXISTS body_chunks (
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (queue_id, seq)
);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_status TEXT,
    last_diagnostic TEXT,
    last_relay TEXT,
    dsn_notify TEXT,
    dsn_orcpt TEXT,
    PRIMARY KEY (queue_id, idx),
    UNIQUE (queue_id, address)
);
-- due() and next_wakeup() walk this index only: never a scan of every deferred row.
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt);
-- MTA-STS policies (RFC 8461 §5): kept across restarts, served until they expire.
CREATE TABLE IF NOT EXISTS mta_sts_policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
-- TLS-RPT (RFC 8460): sessions per policy domain, UTC day, policy, MX and result type
-- (result '' is a success), until the day's report has been queued.
CREATE TABLE IF NOT EXISTS tls_results (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy TEXT NOT NULL,
    mx TEXT NOT NULL,
    result TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (domain, day, policy_type, mx, result)
) WITHOUT ROWID;
"""

# Columns added to a table after its first version: (table, column, type). A queue whose
# user_version is older gets the ones it lacks (CREATE TABLE IF NOT EXISTS leaves its tables
# as they were).
_MIGRATIONS = (
    ("messages", "dsn_ret", "TEXT"),
    ("messages", "dsn_envid", "TEXT"),
    ("recipients", "dsn_notify", "TEXT"),
    ("recipients", "dsn_orcpt", "TEXT"),
)

_MSG_COLS = (
    "queue_id, sender, arrival, size, smtputf8, eightbit, is_dsn, held, hold_reason, "
    "delay_notified, dsn_ret, dsn_envid"
)
_RCPT_COLS = (
    "queue_id, address, state, attempts, next_attempt, last_status, last_diagnostic, last_relay,"
    " dsn_notify, dsn_orcpt"
)

# One message as JSON, built by SQLite: the keys and order of QueuedMessage and
# QueuedRecipient; REALs printed with 17 significant digits so they read back as the same float;
# json('true') is a constant SQLite computes once per statement, not once per row.
_RCPT_JSON = (
    "json_object('address', r.address, 'state', r.state, 'attempts', r.attempts,"
    " 'next_attempt', json(printf('%!.17g', r.next_attempt)), 'last_status', r.last_status,"
    " 'last_diagnostic', r.last_diagnostic, 'last_relay', r.last_relay,"
    " 'notify', r.dsn_notify, 'orcpt', r.dsn_orcpt)"
)
_MSG_JSON = (  # constant text: no value is interpolated
    "json_object('queue_id', m.queue_id, 'sender', m.sender,"  # noqa: S608
    " 'arrival', json(printf('%!.17g', m.arrival)), 'size', m.size,"
    f" 'recipients', (SELECT json_group_array({_RCPT_JSON}) FROM"
    " (SELECT * FROM recipients WHERE queue_id = m.queue_id ORDER BY idx) r),"
    " 'smtputf8', iif(m.smtputf8, json('true'), json('false')),"
    " 'eightbit', iif(m.eightbit, json('true'), json('false')),"
    " 'is_dsn', iif(m.is_dsn, json('true'), json('false')),"
    " 'held', iif(m.held, json('true'), json('false')), 'hold_reason', m.hold_reason,"
    " 'delay_notified', iif(m.delay_notified, json('true'), json('false')),"
    " 'ret', m.dsn_ret, 'envid', m.dsn_envid)"
)


TlsResultKey = tuple[str, str, str, str, str]  # domain, day, policy type, MX, result ('' = ok)
TlsResultRow = tuple[str, str, str, str, int]  # policy type, policy, MX, result, count
StsRow = tuple[str, str, float, float]  # policy id, policy text, fetched, expires (epoch)
_MsgRow = tuple[str, str, float, int, int, int, int, int, "str | None", int, "str | None",
                "str | None"]
_RcptRow = tuple[str, str, str, int, float, "str | None", "str | None", "str | None",
                 "str | None", "str | None"]


def _recipient(row: _RcptRow) -> QueuedRecipient:
    return QueuedRecipient(
        address=row[1],
        state=RcptState(row[2]),
        attempts=row[3],
        next_attempt=row[4],
        last_status=row[5],
        last_diagnostic=row[6],
        last_relay=row[7],
        notify=row[8],
        orcpt=row[9],
    )


def _message(row: _MsgRow, rcpts: Sequence[QueuedRecipient]) -> QueuedMessage:
    return QueuedMessage(
        queue_id=row[0],
        sender=row[1],
        arrival=row[2],
        size=row[3],
        recipients=tuple(rcpts),
        smtputf8=bool(row[4]),
        eightbit=bool(row[5]),
        is_dsn=bool(row[6]),
        held=bool(row[7]),
        hold_reason=row[8],
        delay_notified=bool(row[9]),
        ret=row[10],
        envid=row[11],
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


# How much of a chunked body ``read_dispatch`` returns: more than the listener keeps of a
# header section, so the whole header is in it.
HEAD_SIZE = 320 * 1024


@dataclass(frozen=True)
class ChunkedBody:
    """A body stored in chunks, not read yet: its first ``HEAD_SIZE`` octets."""

    head: bytes


class QueueDB:
    """One connection to the queue database; every public method is one transaction.

    Not thread-safe by itself: one thread at a time (the async store gives each connection its
    own single thread).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._in_batch = False
        self.commits = 0  # committed write transactions: proves group commit in tests

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
            raise _translate(exc) from exc
        try:
            db = cls(conn, qdir)
            db._setup()
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc) from exc
        if new_db:
            os.chmod(db_file, 0o600)
        # The database and its WAL exist now; make their directory entries durable too.
        _fsync_dir(qdir)
        return db

    def _setup(self) -> None:
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("PRAGMA foreign_keys = ON")
        (version,) = c.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                _add_missing_columns(c)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> QueueDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run several write methods in one transaction (group commit).

        Each write inside runs in its own savepoint, so one failing operation is rolled back
        alone; COMMIT at the end is the durability point for all of them.
        """
        if self._in_batch:
            raise RuntimeError("nested batch")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        self._in_batch = True
        try:
            yield
            self._conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from exc
            raise
        finally:
            self._in_batch = False

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if not self._in_batch:
            with self.batch():
                return self._write(op)
        self._conn.execute("SAVEPOINT op")
        try:
            result = op(self._conn)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK TO op")
                self._conn.execute("RELEASE op")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from exc
            raise
        self._conn.execute("RELEASE op")
        return result

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on one consistent snapshot (a read transaction)."""
        try:
            if self._in_batch:
                return op(self._conn)
            self._conn.execute("BEGIN")
            try:
                return op(self._conn)
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

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

    def list_messages(self) -> list[QueuedMessage]:
        """Every queued message, oldest first (reads the whole queue)."""

        def op(c: sqlite3.Connection) -> list[QueuedMessage]:
            rcpts: dict[str, list[QueuedRecipient]] = {}
            sql = f"SELECT {_RCPT_COLS} FROM recipients ORDER BY queue_id, idx"  # noqa: S608
            for row in c.execute(sql):
                rcpts.setdefault(row[0], []).append(_recipient(row))
            return [
                _message(row, rcpts.get(row[0], ()))
                for row in c.execute(
                    f"SELECT {_MSG_COLS} FROM messages ORDER BY queue_id"  # noqa: S608
                )
            ]

        return self._read(op)

    def iter_messages(
        self,
        *,
        state: RcptState | None = None,
        domain: str | None = None,
        arrived_before: float | None = None,
        limit: int | None = None,
        chunk: int = _ID_CHUNK,
    ) -> Iterator[QueuedMessage]:
        """Queued messages oldest first, read ``chunk`` at a time: memory stays flat whatever
        the queue's size, and the first message comes out at once.

        Filters: a recipient in ``state`` (and, with ``domain``, that same recipient at that
        domain, case-insensitive), arrival before ``arrived_before``. Each chunk is its own
        read transaction, so a long listing never holds a snapshot open; a message settled
        meanwhile is simply not shown.
        """
        where, params = _list_filter(state, domain, arrived_before)
        sql = f"SELECT {_MSG_COLS} FROM messages m WHERE {where} ORDER BY m.queue_id LIMIT ?"  # noqa: S608

        def page(c: sqlite3.Connection, after: str, size: int) -> list[QueuedMessage]:
            return _with_recipients(c, list(c.execute(sql, [after, *params, size])))

        for batch in self._pages(page, lambda m: m.queue_id, limit, chunk):
            yield from batch

    def iter_json(
        self,
        *,
        state: RcptState | None = None,
        domain: str | None = None,
        arrived_before: float | None = None,
        limit: int | None = None,
        chunk: int = 5000,
    ) -> Iterator[str]:
        """Like ``iter_messages``, but each message as one line of JSON rendered by SQLite
        itself: the fields and values of ``QueuedMessage`` (booleans as booleans, floats
        printed to round-trip exactly), at a small fraction of the cost of building the
        objects in Python (``queue list --json`` over a million messages)."""
        where, params = _list_filter(state, domain, arrived_before)
        sql = (
            f"SELECT m.queue_id, {_MSG_JSON} FROM messages m WHERE {where}"  # noqa: S608
            " ORDER BY m.queue_id LIMIT ?"
        )

        def page(c: sqlite3.Connection, after: str, size: int) -> list[tuple[str, str]]:
            return list(c.execute(sql, [after, *params, size]))

        for batch in self._pages(page, lambda row: row[0], limit, chunk):
            for _qid, text in batch:
                yield text

    def _pages(
        self,
        page: Callable[[sqlite3.Connection, str, int], list[_P]],
        queue_id: Callable[[_P], str],
        limit: int | None,
        chunk: int,
    ) -> Iterator[list[_P]]:
        """Keyset paging by queue id: each page one read transaction of at most ``chunk``."""
        after, left = "", limit
        while left is None or left > 0:
            size = chunk if left is None else min(chunk, left)

            def one_page(c: sqlite3.Connection, after: str = after, size: int = size) -> list[_P]:
                return page(c, after, size)

            batch = self._read(one_page)
            if batch:
                yield batch
            if len(batch) < size:
                return
            after = queue_id(batch[-1])
            if left is not None:
                left -= len(batch)

    def recipients_by_domain_and_age(
        self, now: float, states: Sequence[RcptState], bounds: Sequence[float]
    ) -> list[tuple[str, int, int]]:
        """(domain, age bucket, recipients) for recipients in ``states``: bucket ``i`` holds
        messages younger than ``bounds[i]`` seconds (and not younger than ``bounds[i-1]``),
        bucket ``len(bounds)`` the older ones. Counted by SQLite in one pass, never held."""
        cases = " ".join(
            f"WHEN ? - m.arrival < {float(b)!r} THEN {i}" for i, b in enumerate(bounds)
        )
        sql = (
            "SELECT lower(substr(r.address, instr(r.address, '@') + 1)) AS domain,"  # noqa: S608
            f" CASE {cases} ELSE {len(bounds)} END AS bucket, COUNT(*)"
            " FROM recipients r JOIN messages m ON m.queue_id = r.queue_id"
            f" WHERE r.state IN ({','.join('?' * len(states))})"
            " GROUP BY domain, bucket"
        )
        args = [now] * len(bounds) + [s.value for s in states]
        rows = self._read(lambda c: list(c.execute(sql, args)))
        return [(str(d), int(b), int(n)) for d, b, n in rows]

    def sts_policy(self, domain: str) -> StsRow | None:
        """The cached MTA-STS policy of ``domain``: (policy id, text, fetched, expires)."""
        def op(c: sqlite3.Connection) -> StsRow | None:
            row = c.execute(
                "SELECT policy_id, policy, fetched, expires FROM mta_sts_policies"
                " WHERE domain = ?", (domain,),
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]), float(row[2]),
                                             float(row[3]))
        return self._read(op)

    def store_sts_policy(self, domain: str, row: StsRow) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO mta_sts_policies"
                " (domain, policy_id, policy, fetched, expires) VALUES (?, ?, ?, ?, ?)",
                (domain, *row),
            )
        self._write(op)

    def count_tls_result(self, key: TlsResultKey, policy: str) -> None:
        """One more session for (domain, day, policy type, MX, result)."""
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO tls_results (domain, day, policy_type, mx, result, policy, count)"
                " VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (domain, day, policy_type, mx, result)"
                " DO UPDATE SET count = count + 1, policy = excluded.policy",
                (*key, policy),
            )
        self._write(op)

    def tls_result_days(self, before: str) -> list[tuple[str, str]]:
        """(domain, day) pairs with results of a day before ``before`` (YYYY-MM-DD)."""
        def op(c: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = c.execute(
                "SELECT DISTINCT domain, day FROM tls_results WHERE day < ? ORDER BY day, domain",
                (before,),
            ).fetchall()
            return [(str(d), str(day)) for d, day in rows]
        return self._read(op)

    def tls_results(self, domain: str, day: str) -> list[TlsResultRow]:
        """(policy type, policy, MX, result, count) of one domain's day."""
        def op(c: sqlite3.Connection) -> list[TlsResultRow]:
            rows = c.execute(
                "SELECT policy_type, policy, mx, result, count FROM tls_results"
                " WHERE domain = ? AND day = ? ORDER BY policy_type, mx, result", (domain, day),
            ).fetchall()
            return [(str(a), str(b), str(m), str(r), int(n)) for a, b, m, r, n in rows]
        return self._read(op)

    def forget_tls_results(self, domain: str, day: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM tls_results WHERE domain = ? AND day = ?", (domain, day))
        self._write(op)

    def count(self) -> int:
        return int(self._read(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone())[0])

    def depth(self) -> QueueDepth:
        """Recipients by open state, messages, and the oldest arrivals: what a metrics scrape
        reads. Counts walk the state index (no table rows); the oldest arrivals walk messages
        in queue id order, which is arrival order, and stop at the first match."""

        def op(c: sqlite3.Connection) -> QueueDepth:
            by_state = {
                state: int(n) for state, n in c.execute(
                    "SELECT state, COUNT(*) FROM recipients WHERE state IN (?, ?, ?)"
                    " GROUP BY state",
                    (RcptState.PENDING.value, RcptState.DEFERRED.value, RcptState.HELD.value),
                )
            }
            (messages,) = c.execute("SELECT COUNT(*) FROM messages").fetchone()
            oldest = c.execute(
                "SELECT arrival FROM messages ORDER BY queue_id LIMIT 1"
            ).fetchone()
            oldest_deferred = None
            if by_state.get(RcptState.DEFERRED.value):
                oldest_deferred = c.execute(
                    "SELECT m.arrival FROM messages m WHERE EXISTS (SELECT 1 FROM recipients r"
                    " WHERE r.queue_id = m.queue_id AND r.state = ?)"
                    " ORDER BY m.queue_id LIMIT 1",
                    (RcptState.DEFERRED.value,),
                ).fetchone()
            return QueueDepth(
                recipients=by_state,
                messages=int(messages),
                oldest_arrival=None if oldest is None else float(oldest[0]),
                oldest_deferred_arrival=(
                    None if oldest_deferred is None else float(oldest_deferred[0])
                ),
            )

        return self._read(op)


def _add_missing_columns(c: sqlite3.Connection) -> None:
    for table, column, kind in _MIGRATIONS:
        have = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


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


def _list_filter(
    state: RcptState | None, domain: str | None, arrived_before: float | None
) -> tuple[str, list[object]]:
    """The WHERE clause (after ``m.queue_id > ?``) and parameters of a filtered listing."""
    where, params = ["m.queue_id > ?"], list[object]()
    if arrived_before is not None:
        where.append("m.arrival < ?")
        params.append(arrived_before)
    rcpt_where = []
    if state is not None:
        # "+" keeps SQLite on the (queue_id, idx) key for this per-message check: through the
        # state index it would walk every recipient in that state for each message.
        rcpt_where.append("+r.state = ?")
        params.append(state.value)
    if domain is not None:
        rcpt_where.append("lower(r.address) LIKE ? ESCAPE '\\'")
        params.append(f"%@{_like_literal(domain.lower())}")
    if rcpt_where:
        where.append(
            "EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND "  # noqa: S608
            + " AND ".join(rcpt_where) + ")"
        )
    return " AND ".join(where), params


def _like_literal(text: str) -> str:
    """``text`` matched literally by LIKE ... ESCAPE '\\' (its wildcards escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _with_recipients(c: sqlite3.Connection, rows: list[_MsgRow]) -> list[QueuedMessage]:
    """Messages from their rows, with their recipients read in one query."""
    if not rows:
        return []
    marks = ",".join("?" * len(rows))
    rcpts: dict[str, list[QueuedRecipient]] = {}
    for rrow in c.execute(
        f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id IN ({marks})"  # noqa: S608
        " ORDER BY queue_id, idx",
        [row[0] for row in rows],
    ):
        rcpts.setdefault(rrow[0], []).append(_recipient(rrow))
    return [_message(row, rcpts.get(row[0], ())) for row in rows]


def _fetch(c: sqlite3.Connection, ids: Sequence[str]) -> list[QueuedMessage]:
    """The messages with these ids, in the order given (missing ones skipped)."""
    rows: dict[str, _MsgRow] = {}
    rcpts: dict[str, list[QueuedRecipient]] = {}
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = list(ids[start:start + _ID_CHUNK])
        marks = ",".join("?" * len(chunk))
        for row in c.execute(
            f"SELECT {_MSG_COLS} FROM messages WHERE queue_id IN ({marks})",  # noqa: S608
            chunk,
        ):
            rows[row[0]] = row
        for rrow in c.execute(
            f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id IN ({marks})"  # noqa: S608
            " ORDER BY queue_id, idx",
            chunk,
        ):
            rcpts.setdefault(rrow[0], []).append(_recipient(rrow))
    return [_message(rows[i], rcpts.get(i, ())) for i in ids if i in rows]
