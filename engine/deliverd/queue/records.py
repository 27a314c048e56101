"""What the queue holds, as the engine sees it: recipients and their states, messages, the
outcome of an attempt, the queue's depth; and how a database row becomes one of them.

The column lists and the JSON SQLite builds for a listing are here beside the dataclasses they
must match, so a field is added in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


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



# How much of a chunked body ``read_dispatch`` returns: more than the listener keeps of a
# header section, so the whole header is in it.
HEAD_SIZE = 320 * 1024


@dataclass(frozen=True)
class ChunkedBody:
    """A body stored in chunks, not read yet: its first ``HEAD_SIZE`` octets."""

    head: bytes


MSG_COLS = (
    "queue_id, sender, arrival, size, smtputf8, eightbit, is_dsn, held, hold_reason, "
    "delay_notified, dsn_ret, dsn_envid"
)
RCPT_COLS = (
    "queue_id, address, state, attempts, next_attempt, last_status, last_diagnostic, last_relay,"
    " dsn_notify, dsn_orcpt"
)

# One message as JSON, built by SQLite: the keys and order of QueuedMessage and
# QueuedRecipient; REALs printed with 17 significant digits so they read back as the same float;
# json('true') is a constant SQLite computes once per statement, not once per row.
RCPT_JSON = (
    "json_object('address', r.address, 'state', r.state, 'attempts', r.attempts,"
    " 'next_attempt', json(printf('%!.17g', r.next_attempt)), 'last_status', r.last_status,"
    " 'last_diagnostic', r.last_diagnostic, 'last_relay', r.last_relay,"
    " 'notify', r.dsn_notify, 'orcpt', r.dsn_orcpt)"
)
MSG_JSON = (  # constant text: no value is interpolated
    "json_object('queue_id', m.queue_id, 'sender', m.sender,"  # noqa: S608
    " 'arrival', json(printf('%!.17g', m.arrival)), 'size', m.size,"
    f" 'recipients', (SELECT json_group_array({RCPT_JSON}) FROM"
    " (SELECT * FROM recipients WHERE queue_id = m.queue_id ORDER BY idx) r),"
    " 'smtputf8', iif(m.smtputf8, json('true'), json('false')),"
    " 'eightbit', iif(m.eightbit, json('true'), json('false')),"
    " 'is_dsn', iif(m.is_dsn, json('true'), json('false')),"
    " 'held', iif(m.held, json('true'), json('false')), 'hold_reason', m.hold_reason,"
    " 'delay_notified', iif(m.delay_notified, json('true'), json('false')),"
    " 'ret', m.dsn_ret, 'envid', m.dsn_envid)"
)

MsgRow = tuple[str, str, float, int, int, int, int, int, "str | None", int, "str | None",
                "str | None"]
RcptRow = tuple[str, str, str, int, float, "str | None", "str | None", "str | None",
                 "str | None", "str | None"]


def recipient_from_row(row: RcptRow) -> QueuedRecipient:
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


def message_from_row(row: MsgRow, rcpts: Sequence[QueuedRecipient]) -> QueuedMessage:
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

