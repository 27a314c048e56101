"""The SMTP client: one call, one transaction to one hop, always a result.

``Transport.transact`` runs the handshake (``smtp.handshake``: connect, greeting, EHLO, TLS and
AUTH, the same code ``deliverd probe`` runs) or reuses a pooled session that already did, then
MAIL, RCPT for every recipient and DATA, and returns the raw replies as
a ``TransactionResult``. Network trouble of any kind ends as ``result.failure``; judging what
the replies mean for each recipient is the router's job, not this module's.

This module is long because it holds both halves of one call: the session's life (establish,
pool, reuse, the stale-session retry) and the transaction on it, whose replies decide whether
the session may be pooled again; MAIL, RCPT and DATA are sent pipelined (RFC 2920) when the
server offers it, through ``SmtpSession.exchange``, with the same reply mapping either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from deliverd.config.model import Config, Credentials
from deliverd.core.dsn_params import RcptDsn
from deliverd.core.outcomes import (
    Envelope,
    Hop,
    Reply,
    Route,
    SessionFailure,
    Stage,
    StreamedBody,
    TransactionResult,
)
from deliverd.smtp.errors import (
    STATUS_CONNECT,
    SessionError,
    failure_from_reply,
)
from deliverd.smtp.handshake import (
    Handshake,
    close_after_failure,
    establish,
    retries_in_clear,
)
from deliverd.smtp.policy import (
    WireStuffer,
    dsn_mail_parameters,
    dsn_rcpt_parameters,
    is_eightbit,
    mail_parameters,
    needs_smtputf8,
    size_limit,
    unsafe_address,
    wire_body,
    wire_size,
)
from deliverd.smtp.pool import FailureCache, PooledSession, SessionKey, SessionPool
from deliverd.smtp.pop3 import PopBeforeSmtp
from deliverd.smtp.session import Command, Exchange, SmtpSession
from deliverd.smtp.tls import (
    ContextCache,
    TlsMode,
    TlsPlan,
    plan_for,
)

IDLE_TIMEOUT = 30.0
CACHED_CONNECT_ERROR = "host recently failed to connect (cached)"


@dataclass
class _Progress:
    """What a transaction has produced so far; becomes the ``TransactionResult``."""

    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    failure: SessionFailure | None = None
    aborted: bool = False
    in_sync: bool = True  # the session may carry another transaction


class Transport:
    """SMTP transactions over pooled sessions, under the limits of the current config."""

    def __init__(
        self,
        cfg: Config,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        on_session: Callable[[str], None] | None = None,
    ) -> None:
        self._cfg = cfg
        # Told how each new session was secured: "established", "cleartext" or "failed".
        self._on_session = on_session
        self._pool = SessionPool(cfg.limits, idle_timeout)
        self._failures = FailureCache()
        self._contexts = ContextCache()
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # Per route (None: routing.smarthost): its view of the config and its POP login.
        self._route_cfgs: dict[str | None, Config] = {}
        self._pops: dict[str | None, PopBeforeSmtp] = {None: PopBeforeSmtp(cfg)}

    def update_config(self, cfg: Config) -> None:
        """On reload: new sessions (and limits) follow ``cfg``; idle old ones are closed."""
        self._cfg = cfg
        self._contexts = ContextCache()
        self._route_cfgs = {}
        for name in list(self._pops):
            if name is not None and cfg.route(name) is None:
                del self._pops[name]  # the route is gone
            else:
                self._pops[name].update_config(cfg.for_route(name))
        self._close_later(self._pool.reconfigure(cfg.limits))

    def forget_failures(self) -> None:
        """An operator's flush: every host is worth a try again."""
        self._failures = FailureCache()

    def _config_for(self, route_name: str | None) -> Config:
        """The config as mail on ``route_name`` sees it (its own smart host and mode)."""
        found = self._route_cfgs.get(route_name)
        if found is None:
            found = self._route_cfgs[route_name] = self._cfg.for_route(route_name)
        return found

    def _pop_for(self, route_name: str | None) -> PopBeforeSmtp:
        pop = self._pops.get(route_name)
        if pop is None:
            pop = self._pops[route_name] = PopBeforeSmtp(self._config_for(route_name))
        return pop

    async def close(self) -> None:
        """QUIT every idle session and stop the idle reaper."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await _quit_all(self._pool.drain())
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def transact(
        self,
        hop: Hop,
        envelope: Envelope,
        *,
        credentials: Credentials | None = None,
        ignore_failure_cache: bool = False,
        plan: TlsPlan | None = None,
    ) -> TransactionResult:
        """One transaction to ``hop`` for all of ``envelope.recipients``; never raises for
        network problems. ``credentials`` are used for smart host hops only.
        ``ignore_failure_cache`` connects even to a host that just failed (the planner asks
        for it when every host of a failover list is cached as failed). ``plan`` replaces the
        route's TLS plan (DANE or MTA-STS for a direct hop)."""
        cfg = self._config_for(hop.route_name)
        creds = credentials if hop.route is Route.SMARTHOST else None
        plan = plan or plan_for(hop.route, cfg)
        key = SessionKey(
            hop.address,
            hop.port,
            hop.route,
            creds.username if creds else None,
            _tls_name(hop, plan),
            hop.route_name,
        )
        if not ignore_failure_cache and self._failures.is_cached(key.destination):
            cached = SessionFailure(
                Stage.CONNECT, CACHED_CONNECT_ERROR, status=STATUS_CONNECT, cached=True
            )
            return TransactionResult(hop, failure=cached)
        # POP-before-SMTP: the login must precede the session it authorises (it is reused for
        # valid_for, so this is a no-op for most transactions).
        pop = self._pop_for(hop.route_name) if hop.route is Route.SMARTHOST else None
        if pop is not None and (pop_failure := await pop.ensure()):
            return TransactionResult(hop, failure=pop_failure)
        async with self._pool.slot(key.destination):
            result = await self._attempt(hop, envelope, creds, plan, key, cfg, tls=True)
            failure = result.failure
            if failure is not None and retries_in_clear(failure, plan):
                # Postfix "may": a broken handshake is retried once in clear text.
                clear = await self._attempt(hop, envelope, creds, plan, key, cfg, tls=False)
                result = replace(clear, transcript=result.transcript + clear.transcript)
        return result

    # -- one attempt -------------------------------------------------------------------------

    async def _attempt(
        self,
        hop: Hop,
        envelope: Envelope,
        creds: Credentials | None,
        plan: TlsPlan,
        key: SessionKey,
        cfg: Config,
        *,
        tls: bool,
    ) -> TransactionResult:
        if tls:
            pooled, dead = self._pool.take_idle(key)
            self._close_later(dead)
            if pooled is not None:
                progress, transcript = await self._run(pooled, envelope, cfg)
                if not _lost_while_idle(progress):
                    return _result(hop, progress, transcript, plan, pooled.session)
                # The server dropped the cached session while it sat idle: reconnect once.
        session = SmtpSession(hop, cfg.host.name, cfg.timeouts)
        handshake = Handshake.for_config(plan, creds, cfg)
        try:
            await establish(session, handshake if tls else handshake.in_clear(), self._contexts)
        except SessionError as err:
            if err.failure.stage is Stage.STARTTLS and err.failure.reply is None:
                self._session_secured("failed")
            await close_after_failure(session, err.failure)
            if _host_failed(err.failure):
                self._failures.record(key.destination, cfg.limits.connection_failure_cache)
            return TransactionResult(hop, failure=err.failure, transcript=tuple(session.transcript))
        except BaseException:
            session.abort()  # cancelled (or a bug) half-way through the handshake
            raise
        self._session_secured("established" if session.tls_active else "cleartext")
        pooled = PooledSession(key, session, self._pool.generation)
        progress, transcript = await self._run(pooled, envelope, cfg)
        return _result(hop, progress, transcript, plan, session)

    def _session_secured(self, result: str) -> None:
        if self._on_session is not None:
            self._on_session(result)

    async def _run(
        self, pooled: PooledSession, envelope: Envelope, cfg: Config
    ) -> tuple[_Progress, tuple[str, ...]]:
        """One transaction on an established session, then pool or close the session."""
        session = pooled.session
        pooled.transactions += 1
        progress = _Progress()
        try:
            await _transaction(session, envelope, cfg, progress)
        except SessionError as err:
            progress.failure = err.failure
            progress.in_sync = False
        except BaseException:
            session.abort()  # cancelled or a bug: the dialogue state is unknown
            raise
        transcript = tuple(session.transcript)
        session.transcript.clear()
        if progress.in_sync and session.alive:
            self._close_later(self._pool.put_idle(pooled))
            self._ensure_reaper()
        else:
            session.abort()
        return progress, transcript

    # -- idle sessions -----------------------------------------------------------------------

    def _close_later(self, sessions: list[PooledSession]) -> None:
        if not sessions:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # update_config outside the loop: no QUIT possible, just drop
            for pooled in sessions:
                pooled.session.abort()
            return
        task = loop.create_task(_quit_all(sessions))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while (delay := self._pool.next_expiry()) is not None:
            await asyncio.sleep(delay + 0.01)
            await _quit_all(self._pool.expired())

    @property
    def idle_sessions(self) -> int:
        """Sessions waiting for reuse (for tests and metrics)."""
        return self._pool.idle_count


# -- the transaction itself -----------------------------------------------------------------


async def _transaction(
    session: SmtpSession, envelope: Envelope, cfg: Config, progress: _Progress
) -> None:
    """MAIL, RCPT each recipient, DATA; fills ``progress``, raises ``SessionError`` on I/O.

    When the server offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go out in one
    write and the replies are read back in order, each kept for its own command; otherwise
    each command waits for its reply, as before. DATA is in the group (RFC 2920 allows it as
    the last command; Postfix does the same): it saves a round trip per message, the most a
    transaction has, and costs nothing in safety, because the body only follows a 354 once
    at least one RCPT was accepted. With no recipient accepted the server must refuse DATA
    (503 or 554) and the session is reset; one that says 354 anyway is dropped before a
    byte of body. A refused MAIL leaves its RCPT and DATA replies to be read and ignored
    before RSET. With ``abort_on_rcpt_5xx`` DATA stays out of the group: whether to send it
    depends on every RCPT reply.
    """
    size = await _size_if_sendable(session, envelope, progress)
    if size is None:
        return
    recipients = list(dict.fromkeys(envelope.recipients))
    # DATA joins the group unless the RCPT replies must be seen first (abort_on_rcpt_5xx).
    pipelined = session.pipelining
    data_pipelined = pipelined and not cfg.routing.abort_on_rcpt_5xx
    commands = _commands(envelope, recipients, session.features, size, data_pipelined)
    exchange = session.exchange(commands, pipelined=pipelined)
    if not await _mail_accepted(session, exchange, progress):
        return
    if not await _rcpt_replies(exchange, recipients, progress):
        return
    replies = progress.rcpt_replies.values()
    if not any(r.is_positive for r in replies):
        # A pipelined DATA must then be refused (RFC 2920: 503 or 554); a server that says
        # 354 anyway waits for a body it will never get: drop it, nothing was sent.
        progress.in_sync = await _owed(exchange) and await _reset(session)
        return
    start = await exchange.reply() if data_pipelined else None
    if cfg.routing.abort_on_rcpt_5xx and any(r.is_permanent for r in replies):
        progress.aborted = True
        progress.in_sync = await _reset(session)
        return
    await _send_body(session, envelope.data, start, progress)


async def _size_if_sendable(
    session: SmtpSession, envelope: Envelope, progress: _Progress
) -> int | None:
    """The message's SIZE, or None when this server must not get it (the failure is in
    ``progress``): SMTPUTF8 needed but not offered, a sender SMTP cannot carry, too big."""
    relay = session.hop.relay
    features = session.features
    if needs_smtputf8(envelope) and "smtputf8" not in features:
        progress.failure = SessionFailure(
            Stage.MAIL, f"SMTPUTF8 required but not offered by {relay}",
            temporary=False, status="5.6.7",
        )
        return None
    if unsafe_address(envelope.sender):
        progress.failure = SessionFailure(
            Stage.MAIL, "sender address cannot be sent in SMTP", temporary=False, status="5.1.7"
        )
        return None
    data = envelope.data
    size = wire_size(data) if isinstance(data, bytes) else await _streamed_wire_size(data)
    limit = size_limit(features)
    if limit is not None and size > limit:
        progress.failure = SessionFailure(
            Stage.MAIL, f"message size {size} exceeds size limit {limit} of {relay}",
            temporary=False, status="5.3.4",
        )
        return None
    return size


def _commands(
    envelope: Envelope, recipients: list[str], features: Mapping[str, str], size: int,
    with_data: bool,
) -> list[Command]:
    """MAIL, a RCPT per recipient SMTP can carry, and DATA when it joins the group."""
    smtputf8 = needs_smtputf8(envelope)
    encoding = "utf-8" if smtputf8 else "ascii"
    commands: list[Command] = [(Stage.MAIL, _mail_words(envelope, features, size, smtputf8))]
    commands += [
        (Stage.RCPT, _rcpt_words(r, encoding, features, envelope.dsn.of(r)))
        for r in recipients if not unsafe_address(r)
    ]
    if with_data:
        commands.append((Stage.DATA, (b"DATA",)))
    return commands


async def _mail_accepted(session: SmtpSession, exchange: Exchange, progress: _Progress) -> bool:
    mail = await exchange.reply()
    if mail.is_positive:
        return True
    progress.failure = failure_from_reply(Stage.MAIL, mail)
    # RCPT and DATA replies owed after a refused MAIL are read and ignored.
    progress.in_sync = mail.code != 421 and await _owed(exchange) and await _reset(session)
    return False


async def _rcpt_replies(exchange: Exchange, recipients: list[str], progress: _Progress) -> bool:
    """Each recipient's reply into ``progress``; False when the server closes the session."""
    for recipient in recipients:
        if unsafe_address(recipient):
            progress.rcpt_replies[recipient] = Reply(553, "address not sendable in SMTP", "5.1.3")
            continue
        reply = await exchange.reply()
        progress.rcpt_replies[recipient] = reply
        if reply.code == 421:  # the server is closing the session
            progress.failure = failure_from_reply(Stage.RCPT, reply)
            progress.in_sync = False
            return False
    return True


async def _send_body(
    session: SmtpSession, data: bytes | StreamedBody, start: Reply | None, progress: _Progress
) -> None:
    """DATA (unless its 354 came with the group), the body, and the final reply."""
    if isinstance(data, bytes):
        start, final = await session.data(wire_body(data), start)
    else:
        start, final = await session.data_stream(data.chunks(), start)
    if final is None:
        progress.failure = failure_from_reply(Stage.DATA, start)
        progress.in_sync = start.code != 421 and await _reset(session)
    elif not final.is_positive:
        progress.failure = failure_from_reply(Stage.DATA, final)
        progress.in_sync = final.code != 421
    else:
        progress.data_reply = final


def _mail_words(
    envelope: Envelope, features: Mapping[str, str], size: int, smtputf8: bool
) -> tuple[bytes, ...]:
    """MAIL FROM and its ESMTP parameters, as words of the command line."""
    encoding = "utf-8" if smtputf8 else "ascii"
    params = mail_parameters(features, size, is_eightbit(envelope), smtputf8)
    params += dsn_mail_parameters(features, envelope.dsn)
    return (
        b"MAIL", b"FROM:<" + envelope.sender.encode(encoding) + b">",
        *(p.encode("ascii") for p in params),
    )


def _rcpt_words(recipient: str, encoding: str, features: Mapping[str, str],
                dsn: RcptDsn) -> tuple[bytes, ...]:
    """RCPT TO for one recipient and its DSN parameters, as words of the command line."""
    return (b"RCPT", b"TO:<" + recipient.encode(encoding) + b">",
            *dsn_rcpt_parameters(features, dsn))


async def _owed(exchange: Exchange) -> bool:
    """Read the replies still owed for commands already sent, only to stay in step; True
    when the session may go on. A 354 (a body is awaited), a 421 or a failure to read ends
    it, but never changes the transaction's result: those replies decide nothing."""
    try:
        replies = await exchange.rest()
    except SessionError:
        return False
    return not any(r.code in (354, 421) for r in replies)


async def _streamed_wire_size(body: StreamedBody) -> int:
    """The SIZE of a streamed body: one pass over it, a chunk at a time."""
    stuffer = WireStuffer()
    async for chunk in body.chunks():
        stuffer.feed(chunk)
    stuffer.finish()
    return stuffer.size


async def _reset(session: SmtpSession) -> bool:
    """RSET; True when the session is clean for another transaction."""
    try:
        reply = await session.command(Stage.MAIL, b"RSET")
    except SessionError:
        return False
    return reply.code == 250


def _lost_while_idle(progress: _Progress) -> bool:
    """A reused session that failed before MAIL got a real answer was stale, not refused."""
    failure = progress.failure
    return (
        failure is not None
        and failure.stage is Stage.MAIL
        and (failure.reply is None or failure.reply.code == 421)
        and not progress.rcpt_replies
        and failure.status not in ("5.6.7", "5.1.7", "5.3.4")
    )


def _tls_name(hop: Hop, plan: TlsPlan) -> str | None:
    """Pool key part: sessions are shared only between hops that ask the same of TLS."""
    if plan.dane:
        return "dane:" + hop.host.lower()
    if plan.verify:
        return hop.host.lower()
    if plan.mode is TlsMode.REQUIRED and hop.route is Route.DIRECT:
        return "tls:" + hop.host.lower()
    return None


def _result(
    hop: Hop,
    progress: _Progress,
    transcript: tuple[str, ...],
    plan: TlsPlan,
    session: SmtpSession,
) -> TransactionResult:
    return TransactionResult(
        hop=hop,
        rcpt_replies=dict(progress.rcpt_replies),
        data_reply=progress.data_reply,
        failure=progress.failure,
        transcript=transcript,
        aborted=progress.aborted,
        tls=plan.outcome(session.tls_active).value,
        dsn="dsn" in session.features,
    )


def _host_failed(failure: SessionFailure) -> bool:
    """A failure of the host itself, not of this message: it could not be reached, or it
    would not talk (a timeout, 4xx or 5xx greeting). Such a host is skipped for
    ``limits.connection_failure_cache``; refusals of a sender or recipient are not."""
    return failure.stage in (Stage.CONNECT, Stage.GREETING) and not failure.loop


async def _quit_all(sessions: list[PooledSession]) -> None:
    if sessions:
        await asyncio.gather(*(p.session.quit() for p in sessions), return_exceptions=True)
