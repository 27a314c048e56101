"""SMTP replies and errors, translated once into the engine's vocabulary.

Two halves. The pure half reads a reply (code and text) into a ``Reply`` with a valid enhanced
status code. The boundary half, ``map_errors``, is the one place where aiosmtplib, ssl, socket and
timeout exceptions become a ``SessionFailure``; the transport wraps every network step in it, so a
hostile or broken peer ends a transaction with a result, never with an exception.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from aiosmtplib.errors import (
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from deliverd.core.outcomes import Reply, SessionFailure, Stage

# RFC 3463: class.subject.detail, class one of 2, 4, 5; subject and detail up to three digits.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

# Error strings end up in logs and DSNs; a hostile peer must not be able to fill them.
MAX_ERROR_TEXT = 200

# Status when a reply carries no (usable) enhanced code. 421 is "service closing": the
# connection is gone, as RFC 3463 4.4.2 says; everything else gets the class's "other" code.
_DEFAULT_BY_CODE = {421: "4.4.2"}
_DEFAULT_BY_CLASS = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}
# A code outside 2xx/4xx/5xx where a final reply was due is a protocol error: defer, since a
# confused peer must never turn into a bounce.
PROTOCOL_ERROR_STATUS = "4.5.0"

# Locally detected conditions (no reply from the peer).
STATUS_CONNECT = "4.4.1"  # no answer from host
STATUS_LOST = "4.4.2"  # bad connection
STATUS_TLS_NOT_OFFERED = "4.7.0"
STATUS_TLS_FAILED = "4.7.5"
STATUS_AUTH = "4.7.8"


def parse_enhanced(text: str) -> tuple[str | None, str]:
    """Split a leading enhanced status code off reply text: ``("5.1.1", "no such user")``."""
    stripped = text.lstrip()
    match = _ENHANCED.match(stripped)
    if match is None:
        return None, text.strip()
    klass, subject, detail = match.groups()
    return f"{klass}.{int(subject)}.{int(detail)}", stripped[match.end():].strip()


def reply_from(code: int, text: str) -> Reply:
    """A ``Reply`` from a raw code and (possibly multi-line) text; enhanced code split off."""
    enhanced, rest = parse_enhanced(text)
    if enhanced is not None and enhanced[0] != str(code)[0]:
        # "550 4.1.1" contradicts itself; the basic code decides (RFC 3463 section 2).
        enhanced, rest = None, text.strip()
    return Reply(code, rest, enhanced)


def enhanced_status(reply: Reply) -> str:
    """The enhanced status a reply stands for; same class digit as its code when 2xx/4xx/5xx."""
    klass = str(reply.code)[0] if 200 <= reply.code < 600 else ""
    if reply.enhanced is not None and reply.enhanced[0] == klass:
        return reply.enhanced
    if reply.code in _DEFAULT_BY_CODE:
        return _DEFAULT_BY_CODE[reply.code]
    return _DEFAULT_BY_CLASS.get(klass, PROTOCOL_ERROR_STATUS)


def failure_from_reply(stage: Stage, reply: Reply, error: str = "") -> SessionFailure:
    """A negative reply at ``stage`` as a session failure (4xx temporary, 5xx permanent)."""
    status = enhanced_status(reply)
    temporary = not reply.is_permanent
    if status[0] not in "45":
        # A positive or nonsense code where a refusal was inferred: treat as protocol error.
        status, temporary = PROTOCOL_ERROR_STATUS, True
    return SessionFailure(
        stage=stage,
        error=clip(error or f"{stage.value} refused: {reply}"),
        reply=reply,
        temporary=temporary,
        status=status,
    )


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """One line, at most ``limit`` characters, printable: safe for logs and DSNs."""
    flat = " ".join(text.split())
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class SessionError(Exception):
    """Carries a ``SessionFailure`` out of the session code to ``Transport.transact``."""

    def __init__(self, failure: SessionFailure) -> None:
        super().__init__(failure.error)
        self.failure = failure


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: aiosmtplib hides ssl and socket errors as causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def failure_from_exception(exc: BaseException, stage: Stage) -> SessionFailure:
    """Translate a library/network exception raised at ``stage``; the one mapping table."""
    if isinstance(exc, SessionError):
        return exc.failure
    lost_status = STATUS_CONNECT if stage is Stage.CONNECT else STATUS_LOST

    tls = _first(exc, ssl.SSLError)
    if tls is not None:
        reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or tls
        kind = (
            "certificate verify failed"
            if isinstance(tls, ssl.SSLCertVerificationError)
            else "TLS handshake failed"
        )
        return SessionFailure(Stage.STARTTLS, clip(f"{kind}: {reason}"), status=STATUS_TLS_FAILED)

    response = _first(exc, SMTPResponseException)
    if isinstance(response, SMTPResponseException):
        if response.code < 0:  # aiosmtplib's "invalid response": garbage or oversized reply
            return SessionFailure(
                stage,
                clip(f"protocol error at {stage.value}: {response.message}"),
                status=PROTOCOL_ERROR_STATUS,
            )
        return failure_from_reply(stage, reply_from(response.code, response.message))

    if _first(exc, TimeoutError) is not None:  # also asyncio and SMTPTimeoutError
        what = "connection timed out" if stage is Stage.CONNECT else f"timeout at {stage.value}"
        return SessionFailure(stage, what, status=lost_status)
    if _first(exc, ConnectionRefusedError) is not None:
        return SessionFailure(stage, "Connection refused", status=STATUS_CONNECT)
    if _first(exc, SMTPServerDisconnected) is not None or _first(exc, ConnectionError):
        return SessionFailure(stage, f"lost connection at {stage.value}", status=lost_status)
    os_error = _first(exc, OSError)
    if isinstance(os_error, OSError):
        reason = os_error.strerror or type(os_error).__name__
        return SessionFailure(stage, clip(reason), status=lost_status)
    if isinstance(exc, SMTPException):
        return SessionFailure(stage, clip(f"SMTP error at {stage.value}: {exc.message}"),
                              status=lost_status)
    # ValueError (a control character aiosmtplib refuses to send) and the like: local, and
    # deferring lets an operator look before anything bounces.
    return SessionFailure(stage, clip(f"local error at {stage.value}: {type(exc).__name__}"),
                          status="4.3.0")


_TRANSLATED: tuple[type[BaseException], ...] = (
    SMTPException,
    OSError,  # includes ssl.SSLError, ConnectionError, TimeoutError (asyncio's too)
    EOFError,
    ValueError,
)


@contextmanager
def map_errors(stage: Stage) -> Iterator[None]:
    """Run a network step; any library or socket error leaves as ``SessionError``."""
    try:
        yield
    except SessionError:
        raise
    except _TRANSLATED as exc:
        raise SessionError(failure_from_exception(exc, stage)) from None
