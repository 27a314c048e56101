"""How much free space the queue's filesystem must keep, shared by every way mail gets in."""

from __future__ import annotations

# SQLite's write-ahead log grows to about 1000 pages (4 MiB) between checkpoints before it is
# reused; recording deliveries and removing messages writes to it, so that much must stay free.
WAL_HEADROOM = 8 * 1024 * 1024


def min_free_bytes(max_message_size: int) -> int:
    """Free space the queue's filesystem keeps: 1.5 x the largest message accepted (as
    Postfix's smtpd does) plus room for the queue's write-ahead log, so deliveries can always
    be recorded and bounces queued."""
    return max_message_size * 3 // 2 + WAL_HEADROOM
