"""The small vocabulary every delivery layer speaks.

The transport turns aiosmtplib, ssl and socket errors into a ``TransactionResult`` (raw replies
with the stage they came from); the pure planner in ``router`` turns those into per-recipient
``Outcome``s; the scheduler records them, logs them and builds DSNs from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from deliverd.core.dsn_params import EnvelopeDsn


class Route(StrEnum):
    DIRECT = "direct"
    SMARTHOST = "smarthost"


class Stage(StrEnum):
    """Where in an SMTP session a reply or failure happened."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    POP = "pop"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"

    def is_host_failure(self) -> bool:
        """A failure at this stage is the host's, not the message's: try the next host."""
        return self in _HOST_STAGES


_HOST_STAGES = frozenset(
    {Stage.RESOLVE, Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.STARTTLS, Stage.POP,
     Stage.AUTH}
)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply (or a synthesised one for local failures such as a refused connect)."""

    code: int
    text: str = ""
    enhanced: str | None = None

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True)
class Hop:
    """One concrete next hop: a host name, one of its addresses, a port and the route."""

    host: str
    address: str
    port: int
    route: Route
    preference: int | None = None
    route_name: str | None = None  # the routes[] entry this hop serves, if one matched

    @property
    def relay(self) -> str:
        """Postfix-style ``host[ip]:port``."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class StreamedBody:
    """A body too large to hold in memory: read in bounded chunks each time it is sent.

    ``chunks()`` starts from the beginning on every call; ``head`` is its first chunk (the
    header section is in it: a DSN quotes no more). ``size`` is the stored size in octets.
    """

    size: int
    head: bytes
    chunks: Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    data: bytes | StreamedBody
    smtputf8: bool = False
    eightbit: bool = False
    dsn: EnvelopeDsn = field(default_factory=EnvelopeDsn)  # RFC 3461, passed on where offered


@dataclass(frozen=True)
class SessionFailure:
    """The session failed at ``stage`` for every recipient of the transaction.

    ``reply`` is the server's reply when there was one; ``error`` says what happened locally
    otherwise (``connection refused``, ``timeout``, ``certificate verify failed``...).
    ``temporary`` decides between 4.x.x and 5.x.x when there is no reply.
    """

    stage: Stage
    error: str
    reply: Reply | None = None
    temporary: bool = True
    status: str = "4.4.1"
    loop: bool = False
    cached: bool = False  # not tried: the host failed to connect moments ago


@dataclass(frozen=True)
class TransactionResult:
    """What one SMTP transaction at one hop produced.

    When ``failure`` is set the transaction as a whole failed at that stage (connect, greeting,
    EHLO, TLS, AUTH, MAIL or DATA) and ``rcpt_replies`` holds whatever RCPT replies came before.
    Otherwise ``rcpt_replies`` has one reply per recipient and ``data_reply`` the final reply for
    the recipients that RCPT accepted.
    """

    hop: Hop
    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    failure: SessionFailure | None = None
    transcript: tuple[str, ...] = ()
    aborted: bool = False  # abort_on_rcpt_5xx: RSET sent, no DATA
    tls: str | None = None  # how the session was protected: dane, mta-sts, verified, ...
    dsn: bool = False  # the hop offered DSN (RFC 3461): it took NOTIFY/ORCPT/RET/ENVID


class Kind(StrEnum):
    DELIVERED = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    HELD = "held"


@dataclass(frozen=True)
class Outcome:
    """The end of one attempt for one recipient."""

    recipient: str
    kind: Kind
    status: str  # enhanced status code, e.g. 2.0.0, 4.4.1, 5.1.2
    diagnostic: str  # e.g. "smtp; 550 5.1.1 no such user" or "dns; NXDOMAIN for example.test"
    hop: Hop | None = None
    transcript: tuple[str, ...] = ()
    stage: Stage | None = None  # where a session failure happened, when one did
    route_name: str | None = None  # the routes[] entry the recipient took, if one matched
    tls: str | None = None  # delivered: how the session was protected (TransactionResult.tls)
    # delivered to a hop that offered DSN: any later notice, success included, is the hop's
    hop_dsn: bool = False

    @property
    def relay(self) -> str:
        return self.hop.relay if self.hop else "none"

    @property
    def route(self) -> Route | None:
        return self.hop.route if self.hop else None
