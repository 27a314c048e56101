"""The SMTP listener local applications submit mail to (aiosmtpd on the daemon's own loop).

Policy decisions are pure functions in ``deliverd.submission.policy`` (relay check, hop
count, Received: header, 8-bit detection); ``_SubmissionHandler`` applies them to one aiosmtpd
session (DATA is read by the listener itself, line by line into an ``IncomingMessage``: never
held whole), and
``start_listeners`` binds every configured address on the running loop. A message is
handed to the one way into the queue (``deliverd.submission.cleanup.Intake.admit``, directly or
over an SMTP worker's link) and acknowledged (250) only after that returned, i.e. after its
COMMIT.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from deliverd.config.model import Config, Listener
from deliverd.dkim.keys import DkimKeyError
from deliverd.queue.space import min_free_bytes
from deliverd.queue.store import QueueError, new_queue_id
from deliverd.submission.cleanup import Arrival, WayIn
from deliverd.submission.dsn_smtp import DsnEnvelope, DsnSMTP, keep_rcpt_dsn
from deliverd.submission.gate import REPLY_TOO_MANY, InboundGate
from deliverd.submission.handoff import AskingGate
from deliverd.submission.incoming import IncomingMessage
from deliverd.submission.local import LocalPolicy, UnknownLocalUser, local_policy
from deliverd.submission.policy import (
    IPNetwork,
    envelope_sender,
    parse_networks,
    protocol_name,
    received_header,
    relay_allowed,
)

log = logging.getLogger(__name__)


REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_TOO_BIG = "552 5.3.4 Message too big"
REPLY_NO_STORAGE = "452 4.3.1 Insufficient system storage"
REPLY_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
REPLY_ERROR = "451 4.3.0 Local error in processing"
REPLY_LOST = "451 4.4.2 Connection lost during DATA"
REPLY_UNAVAILABLE = b"421 4.3.0 Service not available, closing transmission channel\r\n"

# MAIL FROM:/RCPT TO: arguments the listener parses itself: an RFC 5322 dot-atom local part
# and an RFC 5321 domain of LDH labels, in angle brackets, then whitespace and parameters.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(
    rf"[ \t]*<(?P<address>(?P<local>{_ATEXT}(?:\.{_ATEXT})*)"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>"
    r"(?:[ \t]+(?P<rest>[^ \t(].*)|[ \t]*)\Z",
    re.DOTALL,
)

# aiosmtpd words some refusals itself; the listener answers them with enhanced status codes.
_LIBRARY_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": REPLY_TOO_BIG,
    "552 Error: Too much mail data": REPLY_TOO_BIG,
}


# ---------------------------------------------------------------------------------------------
# One SMTP session


class _SubmissionSMTP(DsnSMTP):
    """aiosmtpd's protocol with RFC 3461 (``DsnSMTP``), the listener's own wording for size
    refusals, and the inbound session caps: a connection beyond them is answered 421 and
    closed before its greeting."""

    def __init__(
        self, handler: _SubmissionHandler, *, gate: InboundGate | AskingGate,
        limits: Callable[[], tuple[int, int]], **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._limits = limits
        self._gate_client: str | None = None
        self._refused = False
        self._to_ask: str | None = None  # the client to ask an AskingGate about

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self._refused:  # not the STARTTLS re-entry
            client = _ip_of(transport.get_extra_info("peername"))
            if not isinstance(self._gate, InboundGate):
                self._to_ask = client  # asked by the handler, before the greeting
                super().connection_made(transport)
                return
            max_sessions, max_per_client = self._limits()
            reason = self._gate.admit(client, max_sessions, max_per_client)
            if reason is not None:
                self._refused = True
                log.warning("connection refused: client=[%s]: %s reached", client, reason)
                if self._gate.on_refused is not None:
                    self._gate.on_refused(reason)
                # uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance
                writer = cast(asyncio.WriteTransport, transport)
                writer.write(REPLY_TOO_MANY)
                writer.close()
                return
            self._gate_client = client
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        """The client closed its side: aiosmtpd cancels the session's handler, and the
        transport is closed here (False) rather than kept half-open. Under uvloop a client
        that connects and closes at once (a TCP health check) has its handler cancelled before
        the handler's first step, so nothing else would ever close the transport: the socket
        and its place under the session caps stayed taken until the command timeout."""
        if self._refused:
            return None
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._gate_client is not None:
            self._gate.release(self._gate_client)
            self._gate_client = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        client, self._to_ask = self._to_ask, None
        if client is not None and not isinstance(self._gate, InboundGate):
            reply = REPLY_TOO_MANY
            try:
                reason = await self._gate.ask(client)
            except QueueError as exc:  # the daemon is gone: this worker is about to end
                reason, reply = str(exc), REPLY_UNAVAILABLE
            else:
                if reason is not None:
                    reason = f"{reason} reached"
            if reason is not None:
                log.warning("connection refused: client=[%s]: %s", client, reason)
                if self.transport is not None:
                    writer = cast(asyncio.WriteTransport, self.transport)
                    writer.write(reply)
                    writer.close()
                return
            self._gate_client = client
        await super()._handle_client()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read line by line and handed to the handler's ``IncomingMessage`` as it arrives
        (aiosmtpd's own ``smtp_DATA`` would hold the whole message, several times over)."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        handler = self.event_handler
        assert isinstance(handler, _SubmissionHandler)
        incoming = handler.begin(self.session, self.envelope)
        if isinstance(incoming, str):
            await self.push(incoming)
            return
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            failure = await self._read_data(incoming)
            if failure is not None:
                self._set_post_data_state()  # type: ignore[no-untyped-call]
                await self.push(failure)
                return
            status = await handler.finish(self.session, self.envelope, incoming)
        finally:
            incoming.close()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self, incoming: IncomingMessage) -> str | None:
        """Read up to the final dot; the refusal reply if the message cannot be taken (sent
        only once the whole of DATA was read, RFC 5321 4.2.5)."""
        limit = self.data_size_limit
        received = 0
        failure: str | None = None
        mid_line = False  # the previous read ended inside an over-long line
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()  # the connection was lost during DATA
                raise
            except asyncio.LimitOverrunError as exc:
                failure = failure or "500 Line too long (see RFC5321 4.5.3.1.6)"
                await self._reader.readexactly(exc.consumed)
                mid_line = True
                continue
            if line == b".\r\n" and not mid_line:
                return failure
            after_long, mid_line = mid_line, False
            received += len(line)
            if limit and received > limit:
                failure = failure or REPLY_TOO_BIG
            if failure is not None or after_long:
                continue
            if line[:1] == b".":
                line = line[1:]  # dot-unstuffing (RFC 5321 4.5.2)
            incoming.feed(line)
        # The connection went away without the final dot: nothing of it may be queued.
        return failure or REPLY_LOST

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing with a fast path for the common ``<local@domain>``.

        aiosmtpd hands every MAIL and RCPT argument to ``email._header_value_parser``, about a
        tenth of the listener's time in the relay benchmark. A plain dot-atom address in angle
        brackets, possibly followed by parameters, is taken by one regular expression instead;
        it gives what the library gives for it
        (``tests/unit/submission/test_listener_addresses.py`` checks that property), and
        everything else still goes to the library.
        """
        match = _PLAIN_ADDRESS.match(arg)
        if match is None or (
            self.local_part_limit and len(match["local"]) > self.local_part_limit
        ):
            address, rest = super()._getaddr(arg)
            return address, rest
        return match["address"], match["rest"] or ""

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(_LIBRARY_REPLIES.get(status, status))
        else:
            await super().push(status)


class _SubmissionHandler:
    def __init__(
        self,
        *,
        way_in: WayIn,
        hostname: str,
        allow_networks: tuple[IPNetwork, ...],
        trust_loopback: bool,
        min_free: int,
        current: Callable[[], Config],
    ) -> None:
        self.way_in = way_in
        self.current = current
        self.min_free = min_free
        self.hostname = hostname
        self.allow_networks = allow_networks
        self.trust_loopback = trust_loopback

    def policy(self) -> LocalPolicy:
        """Local users' rules of the running config (a reload may change the aliases)."""
        cfg = self.current()
        return local_policy(cfg.local, cfg.masquerade)

    def _short_of_space(self, size: int) -> bool:
        """Refuse before the disk is full: the queue keeps room to record deliveries and to
        queue bounces, which a full disk would make impossible (see ``min_free_bytes``)."""
        try:
            return self.way_in.free_bytes() - size < self.min_free
        except OSError:
            return True

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's EHLO reply with DSN (RFC 3461) before its last line."""
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        if self._short_of_space(0):
            log.error("refusing mail: less than %d bytes free for the queue", self.min_free)
            return REPLY_NO_STORAGE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        peer_ip = _peer_ip(session)
        if not relay_allowed(peer_ip, self.allow_networks, trust_loopback=self.trust_loopback):
            log.warning("relay denied: client=[%s] to=<%s>", peer_ip, address)
            return REPLY_RELAY_DENIED
        try:
            targets = self.policy().resolve_recipient(address)
        except UnknownLocalUser as exc:
            log.warning("refused: client=[%s] to=<%s>: local user without an alias",
                        peer_ip, address)
            return exc.smtp_reply
        envelope.rcpt_tos.extend(t for t in targets if t not in envelope.rcpt_tos)
        envelope.rcpt_options.extend(rcpt_options)
        if isinstance(server, DsnSMTP) and isinstance(envelope, DsnEnvelope):
            keep_rcpt_dsn(envelope, address, targets, server.rcpt_dsn)
        return "250 2.1.5 Ok"

    def begin(self, session: Session, envelope: Envelope) -> IncomingMessage | str:
        """A new message at DATA: its queue id and trace header are chosen now, so the trace
        is the first thing spooled; or the reply refusing the DATA command."""
        if not envelope.rcpt_tos or envelope.mail_from is None:
            return REPLY_ERROR
        queue_id = new_queue_id()
        rcpts = list(envelope.rcpt_tos)
        trace = received_header(
            helo=session.host_name, peer_ip=_peer_ip(session), by_host=self.hostname,
            queue_id=queue_id, recipients=rcpts,
            protocol=protocol_name(session.extended_smtp, bool(envelope.smtp_utf8)),
            when=datetime.now(UTC).astimezone(),
        )
        return IncomingMessage(self.way_in.spool(), trace, self.policy(), queue_id)

    async def finish(self, session: Session, envelope: Envelope, incoming: IncomingMessage) -> str:
        """Hand the message read in full to the way in; the final reply (250 only after the
        COMMIT)."""
        assert envelope.mail_from is not None
        peer_ip = _peer_ip(session)
        spool = incoming.done()
        sender = envelope_sender(envelope.mail_from)
        if self._short_of_space(spool.size):
            log.error("refusing mail: client=[%s] from=<%s>: queue filesystem short of space",
                      peer_ip, sender)
            return REPLY_NO_STORAGE
        dsn = envelope if isinstance(envelope, DsnEnvelope) else DsnEnvelope()
        arrival = Arrival(
            sender, tuple(envelope.rcpt_tos), incoming.written(), f"client=[{peer_ip}]",
            "listener", smtputf8=bool(envelope.smtp_utf8),
            eightbit="BODY=8BITMIME" in envelope.mail_options,
            ret=None if dsn.dsn.ret is None else dsn.dsn.ret.value, envid=dsn.dsn.envid,
            notify=dsn.notify, orcpt=dsn.orcpt,
        )
        try:
            queue_id = await self.way_in.admit(arrival, spool)
        except DkimKeyError as exc:
            log.error("refusing mail: client=[%s] from=<%s>: %s", peer_ip, sender, exc)
            return REPLY_ERROR
        except Exception as exc:  # disk full, I/O, anything: refuse temporarily, store nothing
            log.error("enqueue failed: client=[%s] from=<%s>: %s", peer_ip, sender, exc)
            return REPLY_NO_STORAGE
        return REPLY_QUEUED.format(queue_id=queue_id)


def _peer_ip(session: Session) -> str:
    # typed as str by aiosmtpd, but a (host, port, ...) tuple
    return _ip_of(session.peer)


def _ip_of(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


# ---------------------------------------------------------------------------------------------


def _handler_for(
    listener: Listener, cfg: Config, way_in: WayIn, hostname: str, trust_loopback: bool,
    current: Callable[[], Config],
) -> _SubmissionHandler:
    return _SubmissionHandler(
        way_in=way_in,
        hostname=hostname,
        allow_networks=parse_networks(listener.allow_networks),
        trust_loopback=trust_loopback,
        min_free=min_free_bytes(cfg.limits.max_message_size),
        current=current,
    )


async def start_listeners(
    cfg: Config,
    way_in: WayIn,
    *,
    hostname: str | None = None,
    trust_loopback: bool = True,
    current: Callable[[], Config] | None = None,
    prebound: Mapping[tuple[str, int], socket.socket] | None = None,
    gate: InboundGate | AskingGate | None = None,
) -> list[asyncio.base_events.Server]:
    """Bind every ``cfg.listen`` entry on the running loop; the caller closes the servers.

    Each message goes to ``way_in``: the daemon's ``Intake``, or in an SMTP worker process
    the link to it, which is also the ``gate``. ``trust_loopback=False`` lets tests refuse a
    loopback client by network.
    ``current()`` gives the running config for the local users' rules (aliases,
    masquerading), which a reload changes without rebinding; by default ``cfg``'s.
    ``prebound`` holds sockets bound before the process gave up root (ports below 1024, see
    ``bind_privileged``); a listener on one of them serves a duplicate of it, so a reload
    that closes the servers leaves the bound socket to the next ones.
    ``gate`` counts the sessions against ``limits.max_inbound_sessions`` and
    ``limits.max_inbound_per_client`` of the running config; pass the same one across
    reloads. By default the listeners get a gate of their own.
    """
    now = current if current is not None else (lambda: cfg)
    counter = gate if gate is not None else InboundGate()

    def limits() -> tuple[int, int]:
        running = now().limits
        return running.max_inbound_sessions, running.max_inbound_per_client

    loop = asyncio.get_running_loop()
    name = hostname or cfg.host.name
    servers: list[asyncio.base_events.Server] = []
    try:
        for listener in cfg.listen:
            handler = _handler_for(listener, cfg, way_in, name, trust_loopback, now)

            def factory(handler: _SubmissionHandler = handler) -> SMTP:
                return _SubmissionSMTP(
                    handler,
                    gate=counter,
                    limits=limits,
                    data_size_limit=cfg.limits.max_message_size,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    hostname=name,
                    ident="deliverd",
                    timeout=cfg.timeouts.command,
                    loop=loop,
                )

            bound = (prebound or {}).get((listener.address, listener.port))
            if bound is not None:
                server = await loop.create_server(factory, sock=bound.dup())
            else:
                server = await loop.create_server(
                    factory, host=listener.address, port=listener.port
                )
            servers.append(server)
            log.info("listening on %s port %d", listener.address, listener.port)
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
