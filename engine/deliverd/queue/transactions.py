"""One connection to the queue database and its transactions: the group commit.

Every store that keeps its rows in the queue database (the queue itself, the MTA-STS policy
cache, the TLS-RPT counts) writes through one ``Transactions``, so a write of any of them
inside ``batch`` joins the same COMMIT; the stores beside ``QueueDB`` in this package call its
``_read`` and ``_write``. SQLite errors become ``QueueError`` here, once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class QueueError(Exception):
    """The queue database failed in a way that is not the caller's fault."""


class QueueFullError(QueueError):
    """Disk full or an I/O error while writing: nothing of the operation was stored."""


class QueueMissingError(QueueError, FileNotFoundError):
    """``open(create=False)`` found no queue database."""


# Error names (sqlite3.Error.sqlite_errorname) that mean the storage itself failed.
_STORAGE_FAILURES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")


def translate(exc: sqlite3.Error) -> QueueError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_STORAGE_FAILURES):
        return QueueFullError(f"queue storage failure: {name}: {exc}")
    return QueueError(f"queue database error: {name or type(exc).__name__}: {exc}")


class Transactions:
    """One connection; every ``_write`` is one transaction, or a savepoint of a ``batch``.

    Not thread-safe by itself: one thread at a time (the async store gives each connection its
    own single thread).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._in_batch = False
        self.commits = 0  # committed write transactions: proves group commit in tests

    def close(self) -> None:
        self._conn.close()

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
            raise translate(exc) from exc
        self._in_batch = True
        try:
            yield
            self._conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
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
                raise translate(exc) from exc
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
            raise translate(exc) from exc

