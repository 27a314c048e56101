"""A scripted SMTP sink (aiosmtpd in its own thread) that records what it received.

Used by the tests (as peers with scripted replies), the demo (as the lab's MX hosts) and the
benchmarks. Script it per stage: replace a reply (``greeting="554 no service"``,
``mail="451 4.3.0 try later"``, ``rcpt={"bad@x.test": "550 5.1.1 no such user"}``,
``data="552 5.3.4 too big"``), or misbehave at a stage (``drop="mail"``, ``stall={"greeting":
3}``, ``garbage="ehlo"``). Stages: greeting, ehlo, helo, starttls, auth, mail, rcpt, data (the
DATA command), dot (after the final dot, before the reply), rset, quit; and for ``drop`` only:
handshake (220 to STARTTLS, then bytes that are not TLS) and body (after the first body line).

``pipelining=True`` adds PIPELINING (RFC 2920) to the EHLO reply (aiosmtpd reads pipelined
commands in order either way). Each session records, beside every command, the input that had
already arrived behind it (``SessionRecord.ahead``): commands a client sent without waiting
for this one's reply, which is how tests tell pipelined commands from lock-step ones.

Several sinks may share one port on different loopback addresses (MX hosts of a lab): pick the
port with ``free_port(["127.0.0.11", "127.0.0.12"])``.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

# Reply lines the tests use by name (in the spirit of aiosmtpd's testing/statuscodes.py).
S220_SINK = "220 sink.test ESMTP scripted sink"
S250_QUEUED = "250 2.0.0 Ok: queued"
S421_CLOSING = "421 4.3.2 Service shutting down"
S451_LATER = "451 4.3.0 try again later"
S452_STORAGE = "452 4.3.1 insufficient system storage"
S530_AUTH_REQUIRED = "530 5.7.0 Authentication required"
S535_BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
S550_NO_USER = "550 5.1.1 no such user"
S554_NO_SERVICE = "554 5.3.2 no service"
S554_REJECTED = "554 5.6.0 message rejected"

GARBAGE = {
    "text": b"this is not smtp at all\r\n",
    "code": b"99x what\r\n",
}


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]
    tls: bool
    user: str | None
    peer: str


@dataclass
class SessionRecord:
    peer: str
    commands: list[str] = field(default_factory=list)
    # Per command: the bytes already received behind it when it was read.
    ahead: list[bytes] = field(default_factory=list)
    tls: bool = False
    user: str | None = None


@dataclass(frozen=True)
class Script:
    greeting: str | None = None
    ehlo: str | None = None
    helo: str | None = None
    mail: str | None = None
    rcpt: Mapping[str, str] = field(default_factory=dict)
    data_start: str | None = None
    data: str | None = None
    drop: str | None = None
    stall: Mapping[str, float] = field(default_factory=dict)
    garbage: str | None = None
    garbage_kind: str = "text"  # text | code | huge (multi-MB line) | continuation (endless)
    starttls: bool = False
    implicit_tls: bool = False
    auth: Mapping[str, str] | None = None  # user -> password
    auth_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN")
    auth_require_tls: bool = True
    require_auth: bool = False
    smtputf8: bool = True
    eightbitmime: bool = True
    pipelining: bool = False
    size: int | None = 32 * 1024 * 1024
    hostname: str = "sink.test"
    idle_timeout: float = 60.0  # the server hangs up on a client silent this long


class ServerTls(Protocol):
    """What a sink needs for STARTTLS or implicit TLS: a server context (e.g. a trustme CA's)."""

    def server_context(self) -> ssl.SSLContext: ...


class _ScriptedSMTP(AiosmtpdSMTP):
    """aiosmtpd's server with per-stage interventions applied before the real command."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_Handler(sink), **kwargs)
        self.sink = sink
        self.script = sink.script
        self.record: SessionRecord | None = None
        self._greeted = False
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._scripted(verb, method)

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer: Any = self.session.peer  # annotated str by aiosmtpd, really (host, port)
        self.record = self.sink._new_session(f"{peer[0]}:{peer[1]}", self.script.implicit_tls)
        await super()._handle_client()

    def _scripted(self, verb: str, method: Callable[[str | None], Any]) -> Callable[..., Any]:
        stage = verb.lower()
        override = {
            "ehlo": self.script.ehlo,
            "helo": self.script.helo,
            "mail": self.script.mail,
            "data": self.script.data_start,
        }.get(stage)

        async def run(arg: str | None) -> None:
            shown = f"{verb} {arg.split()[0]}" if verb == "AUTH" and arg else f"{verb} {arg or ''}"
            waiting: Any = getattr(self._reader, "_buffer", b"")  # asyncio.StreamReader's
            self.sink._note(self.record, shown.strip(), bytes(waiting))
            if await self._intervene(stage):
                return
            if override is not None:
                await self.push(override)
                return
            if stage == "starttls" and self.script.drop == "handshake":
                await self.push("220 Ready to start TLS")
                self._writer.write(GARBAGE["text"])  # not a TLS record: the handshake fails
                await self._writer.drain()
                await self._hang_up()
            if stage == "data" and self.script.drop == "body":
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await self._reader.readline()
                await self._hang_up()
            await method(arg)

        return run

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            if await self._intervene("greeting"):
                return
            status = self.script.greeting or status
        await super().push(status)

    async def _intervene(self, stage: str) -> bool:
        """Apply stall, drop or garbage at ``stage``; True when the normal reply is replaced."""
        delay = self.script.stall.get(stage)
        if delay:
            await asyncio.sleep(delay)
        if self.script.drop == stage:
            await self._hang_up()
        if self.script.garbage == stage:
            await self._send_garbage(self.script.garbage_kind)
            return True
        return False

    async def _hang_up(self) -> None:
        # Closing the transport makes aiosmtpd cancel this handler (connection_lost): wait
        # for that rather than reply on a dead connection.
        assert self.transport is not None
        self.transport.close()
        await asyncio.sleep(3600)

    async def _send_garbage(self, kind: str) -> None:
        if kind == "huge":
            chunk = b"250-" + b"x" * (4 * 1024 * 1024) + b"\r\n"
            self._writer.write(chunk)
            await self._writer.drain()
        elif kind == "continuation":
            line = b"250-" + b"y" * 70 + b"\r\n"
            for _ in range(200_000):  # ~15 MB, unless the client hangs up first
                if self.transport is None or self.transport.is_closing():
                    return
                self._writer.write(line * 100)
                await self._writer.drain()
        else:
            self._writer.write(GARBAGE[kind])
            await self._writer.drain()


class _Handler:
    """aiosmtpd handler hooks: scripted replies and the recording of messages."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.script = sink.script

    async def handle_EHLO(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self.script.eightbitmime:
            responses = [r for r in responses if r[4:] != "8BITMIME"]
        if self.script.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    def handle_STARTTLS(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> bool:
        if server.record is not None:
            server.record.tls = True
        return True

    async def handle_MAIL(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        if self.script.require_auth and not session.authenticated:
            return S530_AUTH_REQUIRED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        scripted = self.script.rcpt.get(address)
        if scripted is not None and not scripted.startswith("2"):
            return scripted
        envelope.rcpt_tos.append(address)
        return scripted or "250 2.1.5 Ok"

    async def handle_DATA(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        if await server._intervene("dot"):
            return "250 garbage sent"  # not reached by the client in any useful state
        reply = self.script.data or S250_QUEUED
        if not reply.startswith("2"):
            self.sink._refused_data(bytes(envelope.original_content or b""))
        if reply.startswith("2"):
            record = server.record
            self.sink._received(ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                mail_options=tuple(envelope.mail_options),
                tls=bool(record and record.tls),
                user=record.user if record else None,
                peer=record.peer if record else "",
            ))
        return reply


class Sink:
    """A running scripted SMTP server; read ``messages`` and ``sessions`` from any thread."""

    def __init__(self, address: str, port: int, script: Script, tls: ServerTls | None) -> None:
        self.host = address
        self.port = port
        self.script = script
        self._tls = tls
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._refused: list[bytes] = []
        self._sessions: list[SessionRecord] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{address}", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._protocols: list[_ScriptedSMTP] = []

    # -- records -----------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def refused(self) -> list[bytes]:
        """Message data that a scripted reply after DATA refused, in order."""
        with self._lock:
            return list(self._refused)

    def _refused_data(self, data: bytes) -> None:
        with self._lock:
            self._refused.append(data)

    @property
    def sessions(self) -> list[SessionRecord]:
        with self._lock:
            return copy.deepcopy(self._sessions)

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` messages were accepted; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._messages) >= n, timeout)

    def _new_session(self, peer: str, tls: bool) -> SessionRecord:
        record = SessionRecord(peer, tls=tls)
        with self._lock:
            self._sessions.append(record)
        return record

    def _note(self, record: SessionRecord | None, command: str, ahead: bytes = b"") -> None:
        if record is not None:
            with self._lock:
                record.commands.append(command)
                record.ahead.append(ahead)

    def _received(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def _authenticated(self, record: SessionRecord | None, user: str) -> None:
        if record is not None:
            with self._lock:
                record.user = user

    # -- server ------------------------------------------------------------------------------

    def _factory(self) -> _ScriptedSMTP:
        script = self.script
        starttls_context = None
        if script.starttls and not script.implicit_tls:
            assert self._tls is not None, "STARTTLS needs the tls_ca fixture"
            starttls_context = self._tls.server_context()
        builtin = {"LOGIN", "PLAIN"}
        protocol = _ScriptedSMTP(
            self,
            hostname=script.hostname,
            ident="ESMTP scripted sink",
            tls_context=starttls_context,
            enable_SMTPUTF8=script.smtputf8,
            data_size_limit=script.size,
            auth_require_tls=script.auth_require_tls and not script.implicit_tls,
            auth_exclude_mechanism=sorted(builtin - set(script.auth_mechanisms))
            if script.auth is not None
            else sorted(builtin),
            authenticator=self._authenticator,
            timeout=script.idle_timeout,
            loop=self._loop,
        )
        self._protocols.append(protocol)
        return protocol

    def _authenticator(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        users = self.script.auth or {}
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if user in users and users[user] == password:
                self._authenticated(server.record, user)
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False, message=S535_BAD_CREDENTIALS)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            implicit = None
            if self.script.implicit_tls:
                assert self._tls is not None, "implicit TLS needs the tls_ca fixture"
                implicit = self._tls.server_context()
            self._server = self._loop.run_until_complete(
                self._loop.create_server(self._factory, self.host, self.port, ssl=implicit)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def start(self) -> Sink:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in self._protocols:
            # Both layers: after STARTTLS the TCP transport sits under the TLS one.
            for transport in (protocol.transport, protocol._original_transport):
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
        await asyncio.sleep(0.01)  # let connection_lost run before tasks are cancelled
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            future.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def free_port(addresses: Sequence[str] = ("127.0.0.1",)) -> int:
    """A TCP port currently free on every one of ``addresses`` (loopback IPv4)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
        if all(_bindable(address, port) for address in addresses):
            return port
    raise RuntimeError(f"no common free port on {list(addresses)}")
