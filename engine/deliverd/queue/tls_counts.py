"""TLS-RPT counts (RFC 8460), kept in the queue database until a day's report is queued.

Sessions per policy domain, UTC day, policy type, MX host and result type (result ``''`` is a
success); ``delivery.tls_reporter`` reads the finished days and forgets each once its report
is queued.
"""

from __future__ import annotations

import sqlite3

from deliverd.queue.transactions import Transactions

TlsResultKey = tuple[str, str, str, str, str]  # domain, day, policy type, MX, result ('' = ok)
TlsResultRow = tuple[str, str, str, str, int]  # policy type, policy, MX, result, count


class TlsResultCounts:
    """The ``tls_results`` table, over the queue's connection."""

    def __init__(self, db: Transactions) -> None:
        self._db = db

    def count(self, key: TlsResultKey, policy: str) -> None:
        """One more session for (domain, day, policy type, MX, result)."""
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO tls_results (domain, day, policy_type, mx, result, policy, count)"
                " VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (domain, day, policy_type, mx, result)"
                " DO UPDATE SET count = count + 1, policy = excluded.policy",
                (*key, policy),
            )
        self._db._write(op)

    def days(self, before: str) -> list[tuple[str, str]]:
        """(domain, day) pairs with results of a day before ``before`` (YYYY-MM-DD)."""
        def op(c: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = c.execute(
                "SELECT DISTINCT domain, day FROM tls_results WHERE day < ? ORDER BY day, domain",
                (before,),
            ).fetchall()
            return [(str(d), str(day)) for d, day in rows]
        return self._db._read(op)

    def results(self, domain: str, day: str) -> list[TlsResultRow]:
        """(policy type, policy, MX, result, count) of one domain's day."""
        def op(c: sqlite3.Connection) -> list[TlsResultRow]:
            rows = c.execute(
                "SELECT policy_type, policy, mx, result, count FROM tls_results"
                " WHERE domain = ? AND day = ? ORDER BY policy_type, mx, result", (domain, day),
            ).fetchall()
            return [(str(a), str(b), str(m), str(r), int(n)) for a, b, m, r, n in rows]
        return self._db._read(op)

    def forget(self, domain: str, day: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM tls_results WHERE domain = ? AND day = ?", (domain, day))
        self._db._write(op)
