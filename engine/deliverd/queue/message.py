"""A message as it enters the queue: everything ``QueueDB.enqueue`` stores of it, in one value.

The way in (``deliverd.submission.cleanup``) builds one after every intake step ran; the queue
only stores it. Frozen, so what was decided about a message cannot change on its way to the
COMMIT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from deliverd.queue.spool import BodySpool


@dataclass(frozen=True)
class NewMessage:
    """``body`` is the message as stored (trace header first), bytes or a ``BodySpool`` the
    writer reads chunk by chunk. ``queue_id`` may be chosen beforehand (the trace header names
    it); should it exist already, the queue picks a fresh one. ``ret``, ``envid`` and, per
    recipient address, ``notify`` and ``orcpt`` are the RFC 3461 request it came with."""

    sender: str
    recipients: Sequence[str]
    body: bytes | BodySpool
    smtputf8: bool = False
    eightbit: bool = False
    is_dsn: bool = False
    hold_reason: str | None = None
    queue_id: str | None = None
    ret: str | None = None
    envid: str | None = None
    notify: Mapping[str, str] = field(default_factory=dict)
    orcpt: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))

    @property
    def size(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else self.body.size
