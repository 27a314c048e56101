"""What an operator and a metrics scrape see of the queue: listings read page by page, the
qshape-like counts by domain and age, the depth by recipient state.

Every listing pages by queue id, each page its own read transaction, so memory stays flat and
no snapshot is held open whatever the queue's size; the counts are computed by SQLite in one
pass over an index, never by reading the messages into Python.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from deliverd.queue.records import (
    MSG_COLS,
    MSG_JSON,
    RCPT_COLS,
    MsgRow,
    QueueDepth,
    QueuedMessage,
    QueuedRecipient,
    RcptState,
    message_from_row,
    recipient_from_row,
)
from deliverd.queue.transactions import Transactions

_P = TypeVar("_P")
LISTING_CHUNK = 500  # messages per page of iter_messages


class QueueListing(Transactions):
    """The queue's read-only views for listings and metrics (``QueueDB`` is one)."""

    def list_messages(self) -> list[QueuedMessage]:
        """Every queued message, oldest first (reads the whole queue)."""

        def op(c: sqlite3.Connection) -> list[QueuedMessage]:
            rcpts: dict[str, list[QueuedRecipient]] = {}
            sql = f"SELECT {RCPT_COLS} FROM recipients ORDER BY queue_id, idx"  # noqa: S608
            for row in c.execute(sql):
                rcpts.setdefault(row[0], []).append(recipient_from_row(row))
            return [
                message_from_row(row, rcpts.get(row[0], ()))
                for row in c.execute(
                    f"SELECT {MSG_COLS} FROM messages ORDER BY queue_id"  # noqa: S608
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
        chunk: int = LISTING_CHUNK,
    ) -> Iterator[QueuedMessage]:
        """Queued messages oldest first, read ``chunk`` at a time: memory stays flat whatever
        the queue's size, and the first message comes out at once.

        Filters: a recipient in ``state`` (and, with ``domain``, that same recipient at that
        domain, case-insensitive), arrival before ``arrived_before``. Each chunk is its own
        read transaction, so a long listing never holds a snapshot open; a message settled
        meanwhile is simply not shown.
        """
        where, params = _list_filter(state, domain, arrived_before)
        sql = f"SELECT {MSG_COLS} FROM messages m WHERE {where} ORDER BY m.queue_id LIMIT ?"  # noqa: S608

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
            f"SELECT m.queue_id, {MSG_JSON} FROM messages m WHERE {where}"  # noqa: S608
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


def _with_recipients(c: sqlite3.Connection, rows: list[MsgRow]) -> list[QueuedMessage]:
    """Messages from their rows, with their recipients read in one query."""
    if not rows:
        return []
    marks = ",".join("?" * len(rows))
    rcpts: dict[str, list[QueuedRecipient]] = {}
    for rrow in c.execute(
        f"SELECT {RCPT_COLS} FROM recipients WHERE queue_id IN ({marks})"  # noqa: S608
        " ORDER BY queue_id, idx",
        [row[0] for row in rows],
    ):
        rcpts.setdefault(rrow[0], []).append(recipient_from_row(rrow))
    return [message_from_row(row, rcpts.get(row[0], ())) for row in rows]
