"""The MTA-STS policy cache (RFC 8461 §5), kept in the queue database across restarts.

A row per policy domain: the policy id of the TXT record it was fetched under, the policy
text, when it was fetched and when it expires. ``delivery.sts_policies`` decides when to fetch
and what to serve; this only stores.
"""

from __future__ import annotations

import sqlite3

from deliverd.queue.transactions import Transactions

StsRow = tuple[str, str, float, float]  # policy id, policy text, fetched, expires (epoch)


class StsPolicyCache:
    """The ``mta_sts_policies`` table, over the queue's connection."""

    def __init__(self, db: Transactions) -> None:
        self._db = db

    def get(self, domain: str) -> StsRow | None:
        """The cached MTA-STS policy of ``domain``: (policy id, text, fetched, expires)."""
        def op(c: sqlite3.Connection) -> StsRow | None:
            row = c.execute(
                "SELECT policy_id, policy, fetched, expires FROM mta_sts_policies"
                " WHERE domain = ?", (domain,),
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]), float(row[2]),
                                             float(row[3]))
        return self._db._read(op)

    def store(self, domain: str, row: StsRow) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO mta_sts_policies"
                " (domain, policy_id, policy, fetched, expires) VALUES (?, ?, ?, ?, ?)",
                (domain, *row),
            )
        self._db._write(op)
