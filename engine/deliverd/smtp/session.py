"""One SMTP client connection, driven command by command over aiosmtplib, with a transcript.

aiosmtplib's high-level ``sendmail`` hides the per-command replies the router needs, so this
module speaks at the command level (``execute_command``) and keeps a Postfix-style transcript
("<<< 250 ok", ">>> RCPT TO:<a@b>"). Every network step runs inside ``map_errors``; a failing
step raises ``SessionError`` carrying the ``SessionFailure``. Decisions live in ``policy``
and ``tls`` (this folder); ``transport`` sequences the steps.

``Exchange`` sends a run of commands either one at a time or, when the server offers RFC 2920
PIPELINING, as one group in one write (aiosmtplib cannot: ``pipelining`` adds it underneath);
either way each reply is handed back for the command it answers, in order.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import AsyncIterator, Sequence

import aiosmtplib
from aiosmtplib.errors import SMTPAuthenticationError, SMTPResponseException
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

from deliverd.config.model import Credentials, TimeoutsConfig
from deliverd.core.outcomes import Hop, Reply, SessionFailure, Stage
from deliverd.smtp.errors import (
    PROTOCOL_ERROR_STATUS,
    STATUS_AUTH,
    SessionError,
    clip,
    failure_from_reply,
    map_errors,
    reply_from,
)
from deliverd.smtp.pipelining import ReplyQueue, adopt, command_line
from deliverd.smtp.policy import WireStuffer, is_loop_banner

MAX_TRANSCRIPT_LINES = 400
MAX_TRANSCRIPT_LINE = 512
QUIT_TIMEOUT = 5.0
REDACTED = "<redacted>"

# A command of an ``Exchange``: the stage its failure is reported at, and its words.
Command = tuple[Stage, tuple[bytes, ...]]


async def _open_socket(address: str, port: int, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket; the transport layers SMTP (and TLS) on top."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), seconds)
    except BaseException:
        sock.close()
        raise
    return sock


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, closing abruptly.

    A graceful TLS close waits for the peer's close_notify (up to 30 s); after QUIT, or after
    an error that ends the session, there is nothing left to say, so the socket goes at once.
    """

    def close(self) -> None:
        transport = self.transport
        super().close()
        if isinstance(transport, asyncio.Transport):
            transport.abort()


class SmtpSession:
    """A live SMTP connection to one hop and what the server told us about itself."""

    def __init__(self, hop: Hop, own_name: str, timeouts: TimeoutsConfig) -> None:
        self.hop = hop
        self.own_name = own_name
        self.timeouts = timeouts
        self.transcript: list[str] = []
        self.tls_active = False
        self.authenticated_as: str | None = None
        self._smtp: aiosmtplib.SMTP | None = None
        self._secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"SmtpSession({self.hop.relay}, tls={self.tls_active})"

    # -- state ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    @property
    def features(self) -> dict[str, str]:
        """EHLO keywords (lower case) and their parameters; empty after HELO."""
        return dict(self._smtp.esmtp_extensions) if self._smtp else {}

    @property
    def pipelining(self) -> bool:
        """The server offers RFC 2920 PIPELINING (an EHLO keyword: never after HELO)."""
        return "pipelining" in self.features

    @property
    def auth_mechanisms(self) -> list[str]:
        return [m.upper() for m in self._smtp.server_auth_methods] if self._smtp else []

    def _client(self, stage: Stage) -> aiosmtplib.SMTP:
        if self._smtp is None or not self._smtp.is_connected:
            raise SessionError(
                SessionFailure(stage, f"lost connection at {stage.value}", status="4.4.2")
            )
        return self._smtp

    # -- transcript ----------------------------------------------------------------------

    def note(self, line: str) -> None:
        if len(self.transcript) >= MAX_TRANSCRIPT_LINES:
            return
        for secret in self._secrets:
            line = line.replace(secret, REDACTED)
        if len(line) > MAX_TRANSCRIPT_LINE:
            line = line[: MAX_TRANSCRIPT_LINE - 3] + "..."
        self.transcript.append(line)
        if len(self.transcript) == MAX_TRANSCRIPT_LINES:
            self.transcript[-1] = "... (transcript truncated)"

    def _note_reply(self, code: int, text: str) -> None:
        lines = text.split("\n") or [""]
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            self.note(f"<<< {code}{sep}{line}".rstrip())

    # -- session steps -------------------------------------------------------------------

    async def open(self, implicit_tls: ssl.SSLContext | None) -> None:
        """Connect, read the greeting, refuse a loop. Implicit TLS when a context is given."""
        with map_errors(Stage.CONNECT):
            sock = await _open_socket(self.hop.address, self.hop.port, self.timeouts.connect)
        # hostname is only the TLS server name (SNI and certificate check): the socket is
        # already connected to the hop's address.
        smtp = _Client(
            hostname=self.hop.host,
            sock=sock,
            local_hostname=self.own_name,
            use_tls=implicit_tls is not None,
            start_tls=False,
            tls_context=implicit_tls,
            timeout=self.timeouts.command,
        )
        # From here the socket belongs to aiosmtplib's transport, which closes it on failure.
        with map_errors(Stage.GREETING):
            try:
                response = await smtp.connect(timeout=self.timeouts.greeting)
            except SMTPResponseException as exc:
                if exc.code > 0:
                    self._note_reply(exc.code, exc.message)
                raise
        if smtp.protocol is not None:
            adopt(smtp.protocol)
        self._smtp = smtp
        self.tls_active = implicit_tls is not None
        self._note_reply(response.code, response.message)
        if is_loop_banner(response.message, self.own_name):
            raise SessionError(_loop_failure(Stage.GREETING, self.own_name))

    async def _exchange(self, stage: Stage, words: tuple[bytes, ...], shown: str | None
                        ) -> SMTPResponse:
        smtp = self._client(stage)
        self.note(">>> " + (shown or b" ".join(words).decode("utf-8", "replace")))
        with map_errors(stage):
            response = await smtp.execute_command(*words, timeout=self.timeouts.command)
        self._note_reply(response.code, response.message)
        return response

    async def command(self, stage: Stage, *words: bytes, shown: str | None = None) -> Reply:
        """Send one command and return its reply, whatever the code."""
        response = await self._exchange(stage, words, shown)
        return reply_from(response.code, response.message)

    def exchange(self, commands: Sequence[Command], *, pipelined: bool) -> Exchange:
        """The replies to ``commands``, read in order; see ``Exchange``."""
        return Exchange(self, commands, pipelined)

    def _send_group(self, commands: Sequence[Command]) -> ReplyQueue:
        """Every command of a pipelined group in one write, noted as it goes out."""
        stage = commands[0][0]
        smtp = self._client(stage)
        with map_errors(stage):
            lines = b"".join(command_line(words) for _, words in commands)
            protocol = smtp.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            group = adopt(protocol).begin_group(lines)
        for _, words in commands:
            self.note(">>> " + b" ".join(words).decode("utf-8", "replace"))
        return group

    async def _group_reply(self, group: ReplyQueue, stage: Stage) -> Reply:
        with map_errors(stage):
            response = await group.get(self.timeouts.command)
        self._note_reply(response.code, response.message)
        return reply_from(response.code, response.message)

    def _end_group(self, stage: Stage) -> None:
        """After a group's last reply: anything more in the buffer means the server answered
        more than was asked, so no reply can be trusted to match its command from here."""
        smtp = self._smtp
        protocol = smtp.protocol if smtp is not None else None
        if smtp is None or protocol is None or not smtp.is_connected:
            return  # gone: the next step finds the session lost
        if not adopt(protocol).end_group():
            smtp.close()
            raise SessionError(SessionFailure(
                stage, f"protocol error at {stage.value}: more replies than commands",
                status=PROTOCOL_ERROR_STATUS,
            ))

    async def hello(self) -> None:
        """EHLO, or HELO when EHLO is refused with 5xx; the reply sets the known extensions."""
        name = self.own_name.encode("ascii")
        response = await self._exchange(Stage.EHLO, (b"EHLO", name), None)
        if response.code == 250:
            self._client(Stage.EHLO).last_ehlo_response = response
            if is_loop_banner(response.message, self.own_name):
                raise SessionError(_loop_failure(Stage.EHLO, self.own_name))
            return
        if response.code >= 500:
            response = await self._exchange(Stage.EHLO, (b"HELO", name), None)
            if response.code == 250:
                self._client(Stage.EHLO).last_helo_response = response
                return
        raise SessionError(
            failure_from_reply(Stage.EHLO, reply_from(response.code, response.message))
        )

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        """STARTTLS and the handshake; a refusal is returned, a broken handshake raises."""
        smtp = self._client(Stage.STARTTLS)
        self.note(">>> STARTTLS")
        with map_errors(Stage.STARTTLS):
            try:
                response = await smtp.starttls(
                    server_hostname=self.hop.host,
                    tls_context=context,
                    timeout=self.timeouts.command,
                )
            except SMTPResponseException as exc:
                if exc.code < 0:
                    raise
                self._note_reply(exc.code, exc.message)
                return reply_from(exc.code, exc.message)
        self.tls_active = True
        self._note_reply(response.code, response.message)
        return reply_from(response.code, response.message)

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol (``TLSv1.3``), None in clear text."""
        transport = self._smtp.transport if self._smtp is not None else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return ssl_object.version()
        return None

    def peer_chain(self) -> list[bytes]:
        """The certificates the server sent, leaf first, DER; unverified (DANE checks them).

        Python 3.13 has ``SSLObject.get_unverified_chain``; 3.10 to 3.12 have the same call
        on the private ``_sslobj``. Without either, only the leaf is known.
        """
        transport = self._smtp.transport if self._smtp is not None else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject):
            return []
        getter = getattr(ssl_object, "get_unverified_chain", None)
        if getter is None:
            getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
        if getter is not None:
            chain = getter() or []
            return [_der(cert) for cert in chain]
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    async def authenticate(self, credentials: Credentials, mechanism: str) -> None:
        """AUTH with one mechanism. Every failure defers: a typo must never bounce mail."""
        smtp = self._client(Stage.AUTH)
        self._secrets = _secret_forms(credentials.password)
        methods = {
            "CRAM-MD5": smtp.auth_crammd5,
            "PLAIN": smtp.auth_plain,
            "LOGIN": smtp.auth_login,
        }
        self.note(f">>> AUTH {mechanism} {REDACTED}")
        try:
            with map_errors(Stage.AUTH):
                response = await methods[mechanism](
                    credentials.username, credentials.password, timeout=self.timeouts.command
                )
        except SessionError as err:
            raise SessionError(_auth_failure(err.failure)) from None
        except SMTPAuthenticationError as exc:  # raised by the auth_* helpers themselves
            raise SessionError(_auth_failure(SessionFailure(
                Stage.AUTH, "", reply=reply_from(exc.code, exc.message)))) from None
        self._note_reply(response.code, response.message)
        self.authenticated_as = credentials.username

    async def data(self, body: bytes, start: Reply | None = None) -> tuple[Reply, Reply | None]:
        """DATA: the reply to the command, and the final reply when the body was sent.
        ``start`` is DATA's reply when the command already went out in a pipelined group."""
        if start is None:
            start = await self.command(Stage.DATA, b"DATA")
        if start.code != 354:
            return start, None
        smtp = self._client(Stage.DATA)
        protocol = smtp.protocol
        try:
            with map_errors(Stage.DATA):
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                protocol.write(body)
                self.note(f">>> ({len(body)} octets of message data)")
                self.note(">>> .")
                response = await protocol.read_response(timeout=self.timeouts.data_response)
        except SessionError:
            smtp.close()
            raise
        self._note_reply(response.code, response.message)
        return start, reply_from(response.code, response.message)

    async def data_stream(
        self, chunks: AsyncIterator[bytes], start: Reply | None = None
    ) -> tuple[Reply, Reply | None]:
        """``data`` for a body read in chunks: each is dot-stuffed on the fly and written once
        the previous one has left the socket's buffer, so memory stays bounded whatever the
        size. Should the body fail to read, the connection is dropped before the final dot:
        the next hop never takes half a message."""
        if start is None:
            start = await self.command(Stage.DATA, b"DATA")
        if start.code != 354:
            return start, None
        smtp = self._client(Stage.DATA)
        protocol = smtp.protocol
        stuffer = WireStuffer()
        try:
            with map_errors(Stage.DATA):
                if protocol is None:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                async for chunk in chunks:
                    protocol.write(stuffer.feed(chunk))
                    await self._drained(protocol)
                protocol.write(stuffer.finish())
                self.note(f">>> ({stuffer.size} octets of message data)")
                self.note(">>> .")
                response = await protocol.read_response(timeout=self.timeouts.data_response)
        except BaseException:
            smtp.close()
            raise
        self._note_reply(response.code, response.message)
        return start, reply_from(response.code, response.message)

    async def _drained(self, protocol: SMTPProtocol) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        try:
            await asyncio.wait_for(protocol._drain_helper(), self.timeouts.data_response)
        except TimeoutError:
            raise aiosmtplib.SMTPTimeoutError("timed out sending message data") from None

    async def quit(self) -> None:
        """Polite QUIT, bounded; the connection is closed whatever happens."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                limit = min(float(self.timeouts.command), QUIT_TIMEOUT)
                await asyncio.wait_for(smtp.quit(timeout=limit), limit)
        except (aiosmtplib.SMTPException, OSError, EOFError, ValueError):
            pass  # the peer is going away either way; nothing to report
        finally:
            smtp.close()

    def abort(self) -> None:
        """Drop the connection without a word (after errors the protocol may be out of sync)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


class Exchange:
    """Commands answered in order: one at a time, or as one RFC 2920 pipelined group.

    ``reply()`` gives the reply to the next command. One at a time, it first sends that
    command (exactly ``SmtpSession.command``: nothing goes out that is not asked for).
    Pipelined, the first call writes every command in one write and each reply is matched to
    its command by position (RFC 2920 section 3.1: the server answers in order), so
    ``reply()`` can stop after any of them. ``rest()`` then reads and returns the replies
    still owed for commands already sent, which keeps the dialogue in step (a refused MAIL
    leaves its RCPT and DATA replies to be read and ignored); one at a time it has nothing
    to read.
    """

    def __init__(self, session: SmtpSession, commands: Sequence[Command], pipelined: bool
                 ) -> None:
        self._session = session
        self._commands = tuple(commands)
        self._pipelined = pipelined and len(self._commands) > 1
        self._next = 0
        self._group: ReplyQueue | None = None

    @property
    def pipelined(self) -> bool:
        return self._pipelined

    async def reply(self) -> Reply:
        stage, words = self._commands[self._next]
        self._next += 1
        if not self._pipelined:
            return await self._session.command(stage, *words)
        if self._group is None:
            self._group = self._session._send_group(self._commands)
        reply = await self._session._group_reply(self._group, stage)
        if self._next == len(self._commands):
            self._session._end_group(stage)
        return reply

    async def rest(self) -> list[Reply]:
        replies: list[Reply] = []
        if self._group is None:
            return replies
        while self._next < len(self._commands):
            replies.append(await self.reply())
        return replies


def _der(cert: object) -> bytes:
    """DER of a certificate from ``get_unverified_chain`` (an ``_ssl.Certificate``)."""
    public_bytes = getattr(cert, "public_bytes", None)
    if public_bytes is None:
        return bytes(cert) if isinstance(cert, bytes | bytearray) else b""
    der = public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
    return der if isinstance(der, bytes) else b""


def _secret_forms(password: str) -> tuple[str, ...]:
    """The password as it could appear on the wire, to keep it out of any transcript line."""
    if not password:
        return ()
    encoded = base64.b64encode(password.encode("utf-8")).decode("ascii")
    return (password, encoded)


def _loop_failure(stage: Stage, own_name: str) -> SessionFailure:
    return SessionFailure(
        stage,
        f"mail for this host loops back to myself ({own_name})",
        temporary=False,
        status="5.4.6",
        loop=True,
    )


def _auth_failure(failure: SessionFailure) -> SessionFailure:
    reply = failure.reply
    status = STATUS_AUTH
    if reply is not None and reply.enhanced is not None:
        status = "4" + reply.enhanced[1:]
    error = f"authentication failed: {reply}" if reply is not None else failure.error
    return SessionFailure(Stage.AUTH, clip(error), reply=reply, temporary=True, status=status)

