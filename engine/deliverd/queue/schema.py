"""The queue database's format: its tables, their version, and the migration of an older queue.

``prepare`` runs on every connection: the pragmas that make one COMMIT the durability point
(WAL, ``synchronous=FULL``), then, when the file's ``user_version`` is not ``SCHEMA_VERSION``,
the tables it lacks and the columns added since it was made, in one transaction.
"""

from __future__ import annotations

import sqlite3

DB_NAME = "queue.db"
SCHEMA_VERSION = 4  # 2: mta_sts_policies, tls_results; 3: body_chunks (all IF NOT EXISTS);
# 4: RFC 3461 columns (messages.dsn_ret, dsn_envid; recipients.dsn_notify, dsn_orcpt), added
# by _MIGRATIONS to a queue made before them
BUSY_TIMEOUT_MS = 30_000

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


def prepare(c: sqlite3.Connection) -> None:
    """Pragmas for this connection; create or migrate the tables when the version differs."""
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


def _add_missing_columns(c: sqlite3.Connection) -> None:
    for table, column, kind in _MIGRATIONS:
        have = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
