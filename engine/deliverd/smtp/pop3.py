"""POP-before-SMTP: a POP3 login that opens the smart host's relay for this host for a while.

``pop3_login`` is the client (asyncio streams: nothing blocks the loop). Its TLS follows the
``pop_before_smtp.tls`` policy strictly: ``starttls`` sends STLS and goes no further when the
server refuses it (the password is never sent in clear as a fallback), ``tls`` is POP3S from the
first byte, ``none`` is only allowed with ``allow_plaintext_auth``. Certificate checks follow
the smart host's ``verify_tls``/``ca_file``. Every failure is translated once, in
``_failure``, into a temporary ``SessionFailure`` at ``Stage.POP``: a POP problem defers mail,
never bounces it.

The POP3 server's name is looked up with the engine's own resolver (``dns.nameservers``), like
every other host deliverd connects to; TLS still verifies the configured name.

``PopBeforeSmtp`` remembers when the last login succeeded and logs in again only when it is
older than ``valid_for``; a lock makes concurrent deliveries share one login.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from deliverd.config.model import Config, TlsPolicy
from deliverd.config.model import PopBeforeSmtp as PopSettings
from deliverd.core.outcomes import SessionFailure, Stage
from deliverd.dns.resolver import Addresses, Resolver
from deliverd.smtp.errors import clip
from deliverd.smtp.tls import client_context

log = logging.getLogger("deliverd.smtp.pop3")

POP_FAILURE_STATUS = "4.7.0"
MAX_LINE = 4096  # RFC 1939 allows 512 octets; anything far longer is a broken or hostile peer


@dataclass(frozen=True)
class PopTimeouts:
    connect: float
    command: float


@dataclass(frozen=True)
class PopTls:
    """How certificates are checked (the smart host's ``verify_tls``/``ca_file``)."""

    verify: bool = True
    ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        return client_context(self.verify, self.ca_file)


class PopError(Exception):
    """A POP3 step failed; the message is safe to log (never contains the password)."""


def _check_ok(line: bytes, step: str) -> str:
    """The text of a ``+OK`` reply; ``PopError`` naming ``step`` for anything else."""
    text = line.decode("utf-8", "replace").strip()
    if text.startswith("+OK"):
        return text
    if not text:
        raise PopError(f"connection closed by server at {step}")
    raise PopError(f"{step} refused: {text}")


class _Session:
    """One POP3 conversation over asyncio streams, one command at a time."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self, step: str) -> str:
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        return _check_ok(line[:MAX_LINE], step)

    async def command(self, text: str, step: str) -> str:
        self.writer.write(text.encode("utf-8") + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        return await self.reply(step)

    async def start_tls(self, host: str, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname=host,
                                    ssl_handshake_timeout=self.timeout)

    async def close(self) -> None:
        self.writer.close()
        # The login already succeeded or failed; closing noise changes nothing.
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


async def pop3_login(
    settings: PopSettings,
    *,
    timeouts: PopTimeouts,
    tls: PopTls,
    allow_plaintext_auth: bool,
    resolver: Resolver,
) -> SessionFailure | None:
    """Log in to the POP3 server of ``settings``; None on success, else the failure."""
    where = f"{settings.host}:{settings.port}"
    try:
        await _login(settings, timeouts, tls, allow_plaintext_auth, resolver)
    except (PopError, OSError, EOFError, TimeoutError, ssl.SSLError, UnicodeError) as exc:
        failure = _failure(exc, where, settings.password)
        log.warning("pop-before-smtp login as %s at %s failed: %s",
                    settings.username, where, failure.error)
        return failure
    log.info("pop-before-smtp login as %s at %s ok", settings.username, where)
    return None


async def _addresses(host: str, resolver: Resolver) -> tuple[str, ...]:
    result = await resolver.addresses(host)
    if isinstance(result, Addresses):
        return result.addresses
    raise PopError(f"cannot resolve the POP3 server {host}: {type(result).__name__}")


async def _open(
    settings: PopSettings, addresses: tuple[str, ...], timeouts: PopTimeouts,
    context: ssl.SSLContext | None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the first address that answers (implicit TLS verifies the configured name)."""
    error: OSError | TimeoutError = OSError(f"no address for {settings.host}")
    for address in addresses:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    address, settings.port, limit=MAX_LINE * 2, ssl=context,
                    server_hostname=settings.host if context is not None else None,
                ),
                timeouts.connect,
            )
        except (OSError, TimeoutError) as exc:
            error = exc
    raise error


async def _login(
    settings: PopSettings, timeouts: PopTimeouts, tls: PopTls, allow_plaintext_auth: bool,
    resolver: Resolver,
) -> None:
    if settings.tls is TlsPolicy.NONE and not allow_plaintext_auth:
        raise PopError("tls: none would send the password in clear text; "
                       "set allow_plaintext_auth to permit it")
    if settings.tls not in (TlsPolicy.NONE, TlsPolicy.STARTTLS, TlsPolicy.TLS):
        raise PopError(f"unsupported POP3 tls policy {settings.tls.value}")
    implicit = settings.tls is TlsPolicy.TLS
    context = tls.context() if settings.tls is not TlsPolicy.NONE else None
    addresses = await _addresses(settings.host, resolver)
    reader, writer = await _open(settings, addresses, timeouts, context if implicit else None)
    session = _Session(reader, writer, timeouts.command)
    try:
        await session.reply("greeting")
        if settings.tls is TlsPolicy.STARTTLS:
            assert context is not None
            # A refused STLS ends the session here: USER/PASS never go out in clear.
            await session.command("STLS", "STLS")
            await session.start_tls(settings.host, context)
        await session.command(f"USER {settings.username}", "USER")
        await session.command(f"PASS {settings.password}", "PASS")
        # Logged in is logged in: the server has recorded it, whatever QUIT gets.
        with contextlib.suppress(PopError, OSError, TimeoutError, ssl.SSLError):
            await session.command("QUIT", "QUIT")
    finally:
        await session.close()


def _failure(exc: BaseException, where: str, password: str) -> SessionFailure:
    """The one translation of a POP3 error into the engine's vocabulary."""
    if isinstance(exc, PopError):
        reason = str(exc)
    elif isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        reason = f"TLS handshake failed: {exc.reason or exc}"
    elif isinstance(exc, TimeoutError):
        reason = "timeout"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
    else:
        reason = type(exc).__name__
    if password:
        # Belt and braces: a server that echoes a command back must not leak the password.
        reason = reason.replace(password, "********")
    return SessionFailure(
        stage=Stage.POP,
        error=clip(f"pop-before-smtp at {where}: {reason}"),
        temporary=True,
        status=POP_FAILURE_STATUS,
    )


class PopBeforeSmtp:
    """Keeps a POP-before-SMTP authorisation fresh for the smart host sessions of one engine."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        resolver: Resolver | None = None,
    ) -> None:
        self._clock = clock
        self._given_resolver = resolver
        self._resolver = resolver or _resolver_for(cfg)
        self._lock = asyncio.Lock()
        self._cfg = cfg
        self._valid_until: float | None = None
        self._attempts = 0  # completed logins (good or bad), to let waiters share a result
        self._last_failure: SessionFailure | None = None

    @property
    def enabled(self) -> bool:
        smarthost = self._cfg.routing.smarthost
        return smarthost is not None and smarthost.pop_before_smtp is not None

    def update_config(self, cfg: Config) -> None:
        """Take a reloaded config; changed POP settings make the next ``ensure`` log in."""
        old, new = _settings(self._cfg), _settings(cfg)
        self._cfg = cfg
        self._resolver = self._given_resolver or _resolver_for(cfg)
        if old != new:
            self._valid_until = None

    async def ensure(self, now: float | None = None) -> SessionFailure | None:
        """Make sure a POP3 login younger than ``valid_for`` exists; None when it does.

        ``now`` is the engine's monotonic clock reading (tests pass one to step time).
        """
        settings = _settings(self._cfg)
        if settings is None:
            return None
        if self._fresh(now):
            return None
        seen = self._attempts
        async with self._lock:
            if self._attempts != seen:
                # Someone logged in (or failed to) while we waited: share that outcome
                # instead of hammering the POP server with the same login.
                return self._last_failure
            if self._fresh(now):
                return None
            started = self._now(now)
            smarthost = self._cfg.routing.smarthost
            assert smarthost is not None
            failure = await pop3_login(
                settings,
                timeouts=PopTimeouts(float(self._cfg.timeouts.connect),
                                     float(self._cfg.timeouts.command)),
                tls=PopTls(smarthost.verify_tls, smarthost.ca_file),
                allow_plaintext_auth=smarthost.allow_plaintext_auth,
                resolver=self._resolver,
            )
            self._attempts += 1
            self._last_failure = failure
            # Validity counts from before the login: the server's window started no later.
            self._valid_until = None if failure else started + settings.valid_for
            return failure

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _fresh(self, now: float | None) -> bool:
        return self._valid_until is not None and self._now(now) < self._valid_until


def _resolver_for(cfg: Config) -> Resolver:
    return Resolver(cfg.dns.nameservers, timeout=float(cfg.timeouts.dns))


def _settings(cfg: Config) -> PopSettings | None:
    smarthost = cfg.routing.smarthost
    return None if smarthost is None else smarthost.pop_before_smtp
