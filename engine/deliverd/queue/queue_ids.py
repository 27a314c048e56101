"""Queue ids: time-ordered, unique, short (Postfix long-id style, Crockford base32 upper case)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

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


