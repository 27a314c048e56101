"""The one-line-per-recipient-per-attempt log, Postfix-like in text, one object per line in JSON.

Text::

    3F2A9C1B7D4E: to=<bob@example.test>, relay=mx1.example.test[127.0.0.11]:2525,
    route=direct, delay=1.2, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)

(one line; wrapped here). JSON carries the same fields plus ``ts``. Every value is scrubbed of
CR/LF and control characters: a remote server's reply ends up in these lines and must not be
able to forge a second one. These functions only format what they are given; ``redact`` (and the
filter ``configure_logging`` installs) is the guard that keeps configured passwords out anyway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO

from deliverd.core.outcomes import Outcome

REPLY_MAX = 500  # characters of a remote reply kept in a log line
REDACTED = "*****"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # C0, DEL, C1, Unicode breaks
_DIAGNOSTIC_TYPE = re.compile(r"^[A-Za-z0-9-]+;\s*")
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CORE_FIELDS = frozenset(
    {"ts", "queue_id", "to", "from", "relay", "route", "delay", "dsn", "status", "reply",
     "message", "level", "logger"}
)

FieldValue = str | int | float


def clean(text: str, limit: int | None = None) -> str:
    """One printable line: control characters (CR, LF, TAB, ESC...) become a single space."""
    line = _CONTROL.sub(" ", text).strip()
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def reply_text(diagnostic: str) -> str:
    """The human part of a diagnostic: ``smtp; 550 5.1.1 no such user`` -> ``550 5.1.1 ...``."""
    return clean(_DIAGNOSTIC_TYPE.sub("", diagnostic, count=1), REPLY_MAX)


def format_delay(seconds: float) -> str:
    """Postfix-style: two decimals at most, trailing zeros dropped, whole seconds from 100s."""
    seconds = max(seconds, 0.0)
    if seconds >= 100:
        return str(round(seconds))
    return f"{seconds:.2f}".rstrip("0").rstrip(".") or "0"


def _timestamp(now: datetime | None) -> str:
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_extra(fields: Mapping[str, FieldValue]) -> None:
    for name in fields:
        if not _FIELD_NAME.match(name):
            raise ValueError(f"log field name {name!r} is not lower_snake_case")
        if name in _CORE_FIELDS:
            raise ValueError(f"log field {name!r} would shadow a standard field")


def _text_value(value: FieldValue) -> str:
    return clean(value) if isinstance(value, str) else str(value)


def _json_value(value: FieldValue) -> FieldValue:
    return clean(value) if isinstance(value, str) else value


def format_attempt(
    *,
    queue_id: str,
    outcome: Outcome,
    delay: float,
    fmt: str = "text",
    route: str | None = None,
    sender: str | None = None,
    extra: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> str:
    """One log line for one recipient's attempt (``fmt`` is ``text`` or ``json``).

    ``route`` overrides the route taken from the outcome's hop (``none`` when there was no
    hop); ``sender`` adds ``from=<..>``; ``extra`` adds fields after the standard ones.
    """
    extra = extra or {}
    _check_extra(extra)
    if route is None:
        route = outcome.route.value if outcome.route is not None else "none"
    reply = reply_text(outcome.diagnostic)
    if fmt == "json":
        record: dict[str, FieldValue] = {"ts": _timestamp(now), "queue_id": clean(queue_id),
                                         "to": clean(outcome.recipient)}
        if sender is not None:
            record["from"] = clean(sender)
        record.update({
            "relay": clean(outcome.relay),
            "route": clean(route),
            "delay": round(max(delay, 0.0), 3),
            "dsn": clean(outcome.status),
            "status": outcome.kind.value,
            "reply": reply,
        })
        record.update({k: _json_value(v) for k, v in extra.items()})
        return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))
    _check_format(fmt)
    parts = [f"to=<{clean(outcome.recipient)}>"]
    if sender is not None:
        parts.append(f"from=<{clean(sender)}>")
    parts += [
        f"relay={clean(outcome.relay)}",
        f"route={clean(route)}",
        f"delay={format_delay(delay)}",
        f"dsn={clean(outcome.status)}",
    ]
    parts += [f"{k}={_text_value(v)}" for k, v in extra.items()]
    parts.append(f"status={outcome.kind.value} ({reply})")
    return f"{clean(queue_id)}: " + ", ".join(parts)


def format_event(
    queue_id: str, message: str, *, fmt: str = "text", now: datetime | None = None,
    **fields: FieldValue,
) -> str:
    """A line for anything that is not a delivery attempt.

    ``format_event(qid, "", from_="<a@b>", size=120, nrcpt=2)`` gives
    ``QID: from=<a@b>, size=120, nrcpt=2``; ``format_event(qid, "expired")`` gives
    ``QID: expired``. A trailing underscore lets a field use a keyword (``from_`` -> ``from``).
    """
    named = {k[:-1] if k.endswith("_") else k: v for k, v in fields.items()}
    for name in named:
        if not _FIELD_NAME.match(name) or name in ("ts", "queue_id", "message"):
            raise ValueError(f"log field name {name!r} is not usable")
    if fmt == "json":
        record: dict[str, FieldValue] = {"ts": _timestamp(now), "queue_id": clean(queue_id)}
        if message:
            record["message"] = clean(message)
        record.update({k: _json_value(v) for k, v in named.items()})
        return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))
    _check_format(fmt)
    parts = [clean(message)] if message else []
    parts += [f"{k}={_text_value(v)}" for k, v in named.items()]
    return f"{clean(queue_id)}: " + ", ".join(parts)


def enqueued(queue_id: str, *, sender: str, size: int, nrcpt: int, fmt: str = "text") -> str:
    return format_event(queue_id, "", fmt=fmt, from_=f"<{sender}>", size=size, nrcpt=nrcpt)


def dsn_sent(queue_id: str, dsn_queue_id: str, *, delay_notice: bool = False,
             success: bool = False, fmt: str = "text") -> str:
    label = "delay" if delay_notice else "delivery status" if success else "non-delivery"
    return format_event(queue_id, f"sender {label} notification: {dsn_queue_id}", fmt=fmt)


def _check_format(fmt: str) -> None:
    if fmt != "text":
        raise ValueError(f"unknown log format {fmt!r} (expected 'text' or 'json')")


# --- the guard -----------------------------------------------------------------------------


def _secret_forms(secret: str) -> list[str]:
    # AUTH LOGIN sends the password base64-encoded on a line of its own: hide that form too.
    encoded = base64.b64encode(secret.encode("utf-8")).decode("ascii")
    return [secret, encoded, encoded.rstrip("=")]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each non-empty secret (or its base64) masked."""
    forms = {form for s in secrets if s for form in _secret_forms(s) if form}
    # Longest first, so a secret that contains another is masked whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in every record, after %-formatting and including exception text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info), self.secrets)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


# --- formatters ----------------------------------------------------------------------------


def _one_line(text: str) -> str:
    # Keep tracebacks readable in a line-oriented log: escape line breaks instead of losing them.
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _one_line(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    A message that already is a JSON object (a ``format_attempt(..., fmt="json")`` line) is
    merged with ``level`` and ``logger`` rather than wrapped as a string.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        payload: dict[str, object] | None = None
        if message.startswith("{"):
            try:
                loaded = json.loads(message)
            except ValueError:
                loaded = None
            if isinstance(loaded, dict):
                payload = loaded
        if payload is None:
            payload = {"ts": _timestamp(datetime.fromtimestamp(record.created, UTC)),
                       "message": message}
        payload.setdefault("ts", _timestamp(datetime.fromtimestamp(record.created, UTC)))
        payload["level"] = record.levelname.lower()
        payload["logger"] = record.name
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        return json.dumps(payload, ensure_ascii=False, default=str)


_HANDLER_MARK = "_deliverd_handler"


class LoopBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event loop turn in one write.

    A line logged on a thread running an event loop is kept until the end of the loop's
    current turn (``call_soon``), then written with the others of that turn: the daemon logs a
    line per message received and per delivery, and one ``write`` per line was a system call
    per message. A line from any other thread, and ``flush()`` (which ``logging.shutdown``
    calls at exit), writes everything pending at once, in order. A kill -9 can lose the lines
    of the turn it interrupts, never more.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self.stream.write(text)
            super().flush()
        except Exception:  # a closed or broken stream must not take the daemon down
            self._pending.clear()
        finally:
            self.release()


def configure_logging(
    fmt: str,
    level: int | str,
    stream: IO[str],
    *,
    secrets: Iterable[str] = (),
    logger_name: str = "deliverd",
) -> logging.Handler:
    """Point the ``deliverd`` logger at ``stream``, one line per record, text or JSON.

    Calling it again (SIGHUP reload with new passwords) replaces the handler it installed
    before instead of adding a second one. ``secrets`` are masked in every record.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected 'text' or 'json')")
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        old.flush()
        logger.removeHandler(old)
    handler = LoopBatchingHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
