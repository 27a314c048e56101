"""The one way into the queue (Postfix's ``cleanup``): every source hands its message to
``Intake``, which applies every intake rule in one order, once.

The sources: the SMTP listener (in the daemon, or in an SMTP worker whose link hands the
message to the daemon's ``Intake``: ``deliverd.submission.handoff.serve_link``), the maildrop's
pickup (``deliverd sendmail``), ``deliverd send``, and the notices the engine writes itself
(DSNs and TLS reports, ``deliverd.reports.notices``). The order (docs/architecture.md, "One way
into the queue"):

1. recipients are resolved to local users' aliases by the source, as they arrive (the listener
   answers each RCPT), with ``Intake.policy()``;
2. the content is written through an ``IncomingMessage`` (``receive``): the trace header first,
   then the header section rewritten by local users' rules and its ``Received:`` fields
   counted, 8-bit content noticed, bare LF made CRLF, all on the stream;
3. ``admit``: the envelope sender qualified and masqueraded; held as a mail loop past
   ``limits.max_hops``; SMTPUTF8 and 8-bit flags (declared, or implied by an address or the
   content); DKIM signatures between the trace header and the message; the queue's COMMIT (the
   id is returned, and a 250 may be sent, only after it); the scheduler woken.

Bodies stay bounded: content goes into a ``BodySpool`` (memory up to 1 MiB, then an unnamed
file); only DKIM signing reads a message whole (dkimpy signs in memory), as it always did.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from deliverd.config.model import Config, DkimKey
from deliverd.dkim.keys import DkimKeyError
from deliverd.dkim.signer import signed
from deliverd.queue.database import QueueDB, new_queue_id
from deliverd.queue.message import NewMessage
from deliverd.queue.spool import BodySpool
from deliverd.submission.incoming import IncomingMessage, Written
from deliverd.submission.local import LocalPolicy, local_policy
from deliverd.submission.policy import loop_hold_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """One message at the way in, as its source hands it over; its content is the body the
    source wrote through an ``IncomingMessage`` (``written`` says what was learnt of it).

    ``sender`` is as given (``admit`` qualifies and masquerades it); ``recipients`` are
    resolved already. ``smtputf8`` and ``eightbit`` are what the client declared (SMTPUTF8,
    BODY=8BITMIME). ``origin`` names the source in the log line (``client=[192.0.2.1]``,
    ``uid=1000``); ``source`` is the way it came (``listener``, ``sendmail``, ``send``,
    ``notice``). A ``notice`` is mail the engine writes itself: queued unsigned, with an error
    in the log, rather than lost when a DKIM key cannot be read.
    """

    sender: str
    recipients: tuple[str, ...]
    written: Written
    origin: str
    source: str
    smtputf8: bool = False
    eightbit: bool = False
    is_dsn: bool = False
    notice: bool = False
    ret: str | None = None
    envid: str | None = None
    notify: Mapping[str, str] = field(default_factory=dict)
    orcpt: Mapping[str, str] = field(default_factory=dict)


class MessageQueue(Protocol):
    """The queue ``Intake`` writes to: the daemon's ``QueueStore``, or for ``deliverd send``
    the queue database opened directly."""

    def spool(self) -> BodySpool: ...

    def free_bytes(self) -> int: ...

    async def enqueue(self, message: NewMessage) -> str: ...


class OpenQueue:
    """The queue database a command opened itself (``deliverd send``), as ``Intake`` writes
    to it: each enqueue commits before it returns."""

    def __init__(self, db: QueueDB) -> None:
        self.db = db

    def spool(self) -> BodySpool:
        return BodySpool(self.db.path)

    def free_bytes(self) -> int:
        st = os.statvfs(self.db.path)
        return st.f_bavail * st.f_frsize

    async def enqueue(self, message: NewMessage) -> str:
        return self.db.enqueue(message)


class WayIn(Protocol):
    """What the listener hands a message to: the daemon's ``Intake``, or in an SMTP worker
    process the link to it (``deliverd.submission.handoff.QueueLink``)."""

    def spool(self) -> BodySpool: ...

    def free_bytes(self) -> int: ...

    async def admit(self, arrival: Arrival, body: BodySpool) -> str: ...


def local_trace(host: str, how: str, queue_id: str, when: datetime) -> bytes:
    """Postfix's ``Received: by host (Postfix, from userid N)`` for mail that did not come over
    SMTP: ``how`` says from where (``deliverd pickup, from userid 1000``)."""
    return (f"Received: by {host} ({how})\r\n"
            f"\tid {queue_id}; {format_datetime(when)}\r\n").encode("ascii")


class Intake:
    """The daemon's (or ``deliverd send``'s) one way into ``queue``; ``current()`` is the
    running config (a reload changes aliases, DKIM keys, the hop limit);
    ``on_enqueued(queue_id, source)`` is called after each COMMIT (the scheduler's wake-up)."""

    def __init__(
        self, queue: MessageQueue, current: Callable[[], Config],
        on_enqueued: Callable[[str, str], None],
    ) -> None:
        self.queue = queue
        self.current = current
        self.on_enqueued = on_enqueued

    def policy(self) -> LocalPolicy:
        """Local users' rules of the running config."""
        cfg = self.current()
        return local_policy(cfg.local, cfg.masquerade)

    def spool(self) -> BodySpool:
        return self.queue.spool()

    def free_bytes(self) -> int:
        return self.queue.free_bytes()

    def receive(self, queue_id: str, trace: bytes) -> IncomingMessage:
        """A new message's content, to be written as it arrives (the trace header first)."""
        return IncomingMessage(self.spool(), trace, self.policy(), queue_id)

    def take(self, queue_id: str, trace: bytes, data: bytes) -> tuple[BodySpool, Written]:
        """A message a local source has as bytes, written through ``receive`` all at once."""
        incoming = self.receive(queue_id, trace)
        try:
            incoming.write_message(data)
            return incoming.done(), incoming.written()
        except BaseException:
            incoming.close()
            raise

    async def admit_local(
        self, message: bytes, sender: str, recipients: Sequence[str], *, how: str, origin: str,
        source: str, smtputf8: bool = False, is_dsn: bool = False, notice: bool = False,
    ) -> str:
        """``admit`` for a message this host made (``deliverd send``, a notice): a new queue
        id, a trace header saying ``how`` it came, then the content written from bytes."""
        queue_id = new_queue_id()
        trace = local_trace(self.current().host.name, how, queue_id,
                            datetime.now(UTC).astimezone())
        body, written = self.take(queue_id, trace, message)
        arrival = Arrival(sender, tuple(recipients), written, origin, source,
                          smtputf8=smtputf8, is_dsn=is_dsn, notice=notice)
        try:
            return await self.admit(arrival, body)
        finally:
            body.close()

    async def admit(self, arrival: Arrival, body: BodySpool) -> str:
        """Queue the message; its queue id, returned only after the COMMIT. Raises
        ``DkimKeyError`` (a key cannot be read; nothing queued) or the queue's error. The
        caller keeps ``body`` and closes it."""
        cfg = self.current()
        sender = self.policy().sender(arrival.sender)
        recipients = arrival.recipients
        hold_reason = loop_hold_reason(arrival.written.hops, cfg.limits.max_hops)
        smtputf8 = arrival.smtputf8 or not all(a.isascii() for a in (sender, *recipients))
        stored = await self._signed(cfg.dkim, body, arrival)
        try:
            queue_id = await self.queue.enqueue(NewMessage(
                sender, recipients, stored, smtputf8=smtputf8,
                eightbit=arrival.eightbit or arrival.written.eightbit, is_dsn=arrival.is_dsn,
                hold_reason=hold_reason, queue_id=arrival.written.queue_id, ret=arrival.ret,
                envid=arrival.envid, notify=arrival.notify, orcpt=arrival.orcpt,
            ))
        finally:
            if stored is not body:
                stored.close()
        dsn = "".join(f" {k}={v}" for k, v in (("ret", arrival.ret), ("envid", arrival.envid))
                      if v)
        log.info("%s: %s from=<%s> nrcpt=%d size=%d%s%s", queue_id, arrival.origin, sender,
                 len(recipients), stored.size, dsn,
                 f" held: {hold_reason}" if hold_reason else "")
        try:
            self.on_enqueued(queue_id, arrival.source)
        except Exception:  # the scheduler's wake-up must never turn a queued message into an error
            log.exception("%s: on_enqueued callback failed", queue_id)
        return queue_id

    async def _signed(
        self, dkim: tuple[DkimKey, ...], body: BodySpool, arrival: Arrival
    ) -> BodySpool:
        """The body with its DKIM signatures below the trace header (never signed): every
        attempt and route sends these bytes. dkimpy signs a whole message in memory, so signed
        mail is held once here; RSA in pure Python takes milliseconds: off the loop."""
        if not dkim:
            return body
        try:
            return await asyncio.to_thread(
                _signed_spool, dkim, body, arrival.written.trace_size, self.spool
            )
        except DkimKeyError as exc:
            if not arrival.notice:
                raise
            log.error("%s: notice queued unsigned: %s", arrival.written.queue_id, exc)
            return body


def _signed_spool(
    dkim: tuple[DkimKey, ...], spool: BodySpool, trace_size: int, new_spool: Callable[[], BodySpool]
) -> BodySpool:
    """The message of ``spool`` with its DKIM signatures between the trace and the message."""
    data = spool.getvalue()
    out = new_spool()
    try:
        out.write(data[:trace_size])
        out.write(signed(dkim, data[trace_size:]))
    except BaseException:
        out.close()
        raise
    return out
