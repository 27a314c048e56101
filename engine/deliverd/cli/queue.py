"""``deliverd queue list|summary|show|flush|hold|release|delete`` and ``deliverd send``.

Both work on the queue database directly (its own connection; the daemon may be running: WAL
lets both in), then nudge a running daemon with SIGUSR1 so a flush, release or new message is
acted on at once instead of at the next scheduled wake-up.

Exit codes: 0 ok, 1 unknown queue id, 2 config error (or bad arguments), 3 queue storage error,
75 (send) a DKIM key cannot be read, so the message is not queued unsigned.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from email.parser import BytesHeaderParser
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TextIO, TypeVar

from deliverd.config.loader import ConfigError, load_config
from deliverd.config.model import Config
from deliverd.core.units import parse_duration
from deliverd.dkim.keys import DkimKeyError
from deliverd.queue.database import (
    QueueDB,
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    QueueMissingError,
    RcptState,
)
from deliverd.queue.summary import AGE_BOUNDS_MINUTES, format_summary, summarise, summary_json
from deliverd.submission.cleanup import Intake, OpenQueue
from deliverd.submission.incoming import header_block
from deliverd.submission.local import UnknownLocalUser, local_policy

DEFAULT_CONFIG = Path("/etc/deliverd/deliverd.toml")
PID_NAME = "deliverd.pid"  # written by deliverd.daemon into queue.path

EXIT_OK = 0
EXIT_UNKNOWN_ID = 1
EXIT_CONFIG = 2
EXIT_QUEUE = 3
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: a DKIM key cannot be read, nothing was queued

_T = TypeVar("_T")
_Action = Callable[[argparse.Namespace, Config], int]


# ---------------------------------------------------------------------------------------------
# argparse wiring


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="inspect and manage the delivery queue")
    _common(q, top=True)
    actions = q.add_subparsers(dest="queue_action", required=True, metavar="ACTION")
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, func, help_text, takes_id in (
        ("list", _list, "queued messages with their recipients' state, oldest first", False),
        ("summary", _summary, "recipients by destination domain and age (qshape)", False),
        ("show", _show, "one message: envelope, recipients and headers", True),
        ("flush", _flush, "make every deferred recipient due now", False),
        ("hold", _hold, "hold a message until released", True),
        ("release", _release, "release a held message (due now)", True),
        ("delete", _delete, "delete a message without a DSN", True),
    ):
        p = actions.add_parser(name, help=help_text)
        _common(p, top=False)
        if takes_id:
            p.add_argument("queue_id", metavar="ID")
        p.set_defaults(func=_with_config(func))
        parsers[name] = p
    _list_options(parsers["list"])
    _summary_options(parsers["summary"])

    s = sub.add_parser("send", help="queue a message directly (no SMTP) and wake the daemon")
    _common(s, top=True)
    s.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help="envelope sender ('' for the null sender)")
    s.add_argument("--to", dest="recipients", action="append", required=True,
                   metavar="ADDRESS", help="envelope recipient (repeatable)")
    s.add_argument("--subject", default="deliverd test message",
                   help="subject of the generated message (without MESSAGE_FILE)")
    s.add_argument("message", nargs="?", metavar="MESSAGE_FILE",
                   help="RFC 5322 message to send, '-' for stdin; default: a generated one")
    s.set_defaults(func=_with_config(_send))


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted both before and after the action; SUPPRESS keeps the action's parser from
    # overwriting a value given before it.
    p.add_argument("-c", "--config", type=Path,
                   default=DEFAULT_CONFIG if top else argparse.SUPPRESS,
                   help=f"engine config (default {DEFAULT_CONFIG})")
    p.add_argument("--secrets", type=Path, default=None if top else argparse.SUPPRESS,
                   help="secrets file (default: secrets.toml beside the config)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="machine-readable output")


_OPEN_STATES = (RcptState.PENDING, RcptState.DEFERRED, RcptState.HELD)


def _list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=[s.value for s in _OPEN_STATES],
                   help="only messages with a recipient in this state")
    p.add_argument("--domain", metavar="DOMAIN",
                   help="only messages with a recipient at this domain (with --state: that "
                        "same recipient)")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="only messages that arrived longer ago than this (90s, 15m, 4h, 2d)")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N messages")


def _summary_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", action="append", choices=[s.value for s in _OPEN_STATES],
                   help="recipients in this state (repeatable; default: pending and deferred)")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="the N domains with the most recipients (0: all; default 10)")


def _duration(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _with_config(action: _Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            cfg = load_config(args.config, args.secrets)
        except ConfigError as exc:
            print(f"deliverd: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            return action(args, cfg)
        except QueueError as exc:
            print(f"deliverd: {exc}", file=sys.stderr)
            return EXIT_QUEUE

    return run


# ---------------------------------------------------------------------------------------------
# Opening the queue and waking the daemon


def _open(cfg: Config, *, create: bool) -> QueueDB | None:
    """The queue database, or None when there is none yet (nothing ever queued)."""
    try:
        return QueueDB.open(cfg.queue.path, create=create)
    except QueueMissingError:
        return None


def wake_daemon(queue_path: str | Path, sig: signal.Signals = signal.SIGUSR1) -> bool:
    """``sig`` (SIGUSR1: look at the queue; SIGUSR2: also forget failed hosts) to the daemon
    named by ``<queue>/deliverd.pid`` if it is alive; True if sent."""
    pid_file = Path(queue_path) / PID_NAME
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return False
    if pid <= 0 or not _is_deliverd(pid):
        return False
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True


def _is_deliverd(pid: int) -> bool:
    """Guard against a stale pid file naming an unrelated process (SIGUSR1 would kill it)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"deliverd" in cmdline.read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # /proc works and the process is gone
    except OSError:
        return False
    try:  # no /proc on this system: the best available check is that the pid exists
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Rendering


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


_MSG_FIELDS = tuple(f.name for f in dataclasses.fields(QueuedMessage))
_RCPT_FIELDS = tuple(f.name for f in dataclasses.fields(QueuedRecipient))


def message_json(msg: QueuedMessage) -> dict[str, object]:
    # Field by field rather than dataclasses.asdict, whose recursive deep copy dominated
    # `queue list --json` on a big queue (the fields are all plain values).
    out: dict[str, object] = {name: getattr(msg, name) for name in _MSG_FIELDS}
    out["recipients"] = [
        {**{name: getattr(r, name) for name in _RCPT_FIELDS}, "state": r.state.value}
        for r in msg.recipients
    ]
    return out


def format_table(messages: Iterable[QueuedMessage]) -> str:
    out = io.StringIO()
    write_table(messages, out)
    return out.getvalue()


def write_table(messages: Iterable[QueuedMessage], out: TextIO) -> None:
    """The listing, a message at a time (the header once the first one is known)."""
    count = nrcpt = 0
    for m in messages:
        if count == 0:
            out.write(f"{'QUEUE ID':<14} {'ARRIVAL':<19} {'SIZE':>9}  SENDER\n")
        count += 1
        lines = []
        held = f"  HELD ({m.hold_reason or 'operator'})" if m.held else ""
        lines.append(f"{m.queue_id:<14} {_when(m.arrival):<19} {m.size:>9}  "
                     f"<{m.sender}>{held}")
        for r in m.recipients:
            nrcpt += 1
            detail = f"  attempts={r.attempts}" if r.attempts else ""
            if r.state.value == "deferred":
                detail += f"  next={_when(r.next_attempt)}"
            lines.append(f"    <{r.address}>  {r.state.value}{detail}")
            if r.last_diagnostic:
                lines.append(f"        ({r.last_diagnostic})")
        out.write("\n".join(lines) + "\n")
    if count == 0:
        out.write("Mail queue is empty\n")
    else:
        out.write(f"-- {count} messages, {nrcpt} recipients\n")


def write_json_lines(documents: Iterable[str], out: TextIO) -> None:
    """A JSON array of already-encoded documents, one per line, written as they come."""
    first = True
    out.write("[")
    for text in documents:
        out.write(("\n" if first else ",\n") + text)
        first = False
    out.write("]\n" if first else "\n]\n")


def format_message(msg: QueuedMessage, headers: str) -> str:
    lines = [
        f"queue id:  {msg.queue_id}",
        f"arrival:   {_when(msg.arrival)}",
        f"size:      {msg.size}",
        f"sender:    <{msg.sender}>",
        "flags:     " + (" ".join(
            name for name, on in (("smtputf8", msg.smtputf8), ("8bit", msg.eightbit),
                                  ("dsn", msg.is_dsn), ("delay-notified", msg.delay_notified))
            if on
        ) or "-"),
    ]
    if msg.held:
        lines.append(f"held:      {msg.hold_reason or 'operator'}")
    if msg.ret or msg.envid:
        lines.append("dsn:       " + " ".join(
            f"{name}={value}" for name, value in (("RET", msg.ret), ("ENVID", msg.envid))
            if value))
    lines.append("recipients:")
    for r in msg.recipients:
        lines.append(f"  <{r.address}>  {r.state.value}  attempts={r.attempts}")
        if r.state.value == "deferred":
            lines.append(f"    next attempt: {_when(r.next_attempt)}")
        for label, value in (("notify", r.notify), ("orcpt", r.orcpt),
                             ("status", r.last_status), ("diagnostic", r.last_diagnostic),
                             ("relay", r.last_relay)):
            if value:
                lines.append(f"    {label}: {value}")
    lines += ["headers:", headers.rstrip("\r\n")]
    return "\n".join(lines) + "\n"


def _emit(args: argparse.Namespace, text: str, data: object, out: TextIO = sys.stdout) -> None:
    out.write(json.dumps(data, indent=2) + "\n" if args.json else text)


# ---------------------------------------------------------------------------------------------
# Actions


def _list(args: argparse.Namespace, cfg: Config, out: TextIO | None = None) -> int:
    """Streams: each message is written as it is read (constant memory on any queue)."""
    out = out or sys.stdout
    db = _open(cfg, create=False)
    if db is None:
        out.write("[]\n" if args.json else format_table(()))
        return EXIT_OK
    state = RcptState(args.state) if args.state else None
    before = None if args.older_than is None else time.time() - args.older_than
    with db:
        if args.json:
            # SQLite renders each message's JSON: a million in seconds, one line each.
            write_json_lines(db.iter_json(state=state, domain=args.domain,
                                          arrived_before=before, limit=args.limit), out)
        else:
            write_table(db.iter_messages(state=state, domain=args.domain,
                                         arrived_before=before, limit=args.limit), out)
    return EXIT_OK


def _summary(args: argparse.Namespace, cfg: Config) -> int:
    db = _open(cfg, create=False)
    states = [RcptState(s) for s in args.state or ("pending", "deferred")]
    bounds = [60.0 * m for m in AGE_BOUNDS_MINUTES]
    counts = [] if db is None else _closing(
        db, lambda: db.recipients_by_domain_and_age(time.time(), states, bounds))
    summary = summarise(counts, top=args.top)
    _emit(args, format_summary(summary), summary_json(summary))
    return EXIT_OK


def _show(args: argparse.Namespace, cfg: Config) -> int:
    db = _open(cfg, create=False)
    if db is None:
        return _unknown(args.queue_id)
    with db:
        msg = db.get(args.queue_id)
        if msg is None:
            return _unknown(args.queue_id)
        try:
            # The header section is in the first chunk: a large body is not read whole.
            data = next(db.iter_body(args.queue_id), b"")
        except KeyError:
            return _unknown(args.queue_id)
    headers = header_block(data).decode("utf-8", "replace")
    _emit(args, format_message(msg, headers), {**message_json(msg), "headers": headers})
    return EXIT_OK


def _flush(args: argparse.Namespace, cfg: Config) -> int:
    db = _open(cfg, create=False)
    count = 0 if db is None else _closing(db, db.flush)
    woke = wake_daemon(cfg.queue.path, signal.SIGUSR2)
    _emit(args, f"{count} deferred recipients due now{_woke(woke)}\n",
          {"flushed": count, "daemon_signalled": woke})
    return EXIT_OK


def _hold(args: argparse.Namespace, cfg: Config) -> int:
    return _by_id(args, cfg, "held", lambda db: db.hold(args.queue_id), wake=False)


def _release(args: argparse.Namespace, cfg: Config) -> int:
    return _by_id(args, cfg, "released", lambda db: db.release(args.queue_id), wake=True)


def _delete(args: argparse.Namespace, cfg: Config) -> int:
    return _by_id(args, cfg, "deleted", lambda db: db.delete(args.queue_id), wake=False)


def _by_id(
    args: argparse.Namespace, cfg: Config, done: str, op: Callable[[QueueDB], bool], *,
    wake: bool,
) -> int:
    db = _open(cfg, create=False)
    if db is None or not _closing(db, lambda: op(db)):
        return _unknown(args.queue_id)
    woke = wake_daemon(cfg.queue.path) if wake else False
    _emit(args, f"{args.queue_id}: {done}{_woke(woke)}\n",
          {"queue_id": args.queue_id, done: True, "daemon_signalled": woke})
    return EXIT_OK


def _send(args: argparse.Namespace, cfg: Config) -> int:
    problem = _check_addresses(args.sender, args.recipients)
    if problem:
        print(f"deliverd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.message is None:
        body = build_message(args.sender, args.recipients, args.subject, cfg.host.name)
    elif args.message == "-":
        body = sys.stdin.buffer.read()
    else:
        try:
            body = Path(args.message).read_bytes()
        except OSError as exc:
            print(f"deliverd: {args.message}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        recipients = local_policy(cfg.local, cfg.masquerade).resolve_recipients(args.recipients)
    except UnknownLocalUser as exc:
        print(f"deliverd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with QueueDB.open(cfg.queue.path, create=True) as db:
        try:
            intake = Intake(OpenQueue(db), lambda: cfg, lambda _queue_id, _source: None)
            uid = os.getuid()
            queue_id = asyncio.run(intake.admit_local(
                body, args.sender, recipients, how=f"deliverd send, uid {uid}",
                origin=f"uid={uid}", source="send"))
        except DkimKeyError as exc:
            print(f"deliverd: not queued: {exc}", file=sys.stderr)
            return EXIT_TEMPFAIL
        queued = db.get(queue_id)
    hold_reason = queued.hold_reason if queued is not None else None
    woke = wake_daemon(cfg.queue.path)
    held = f" (held: {hold_reason})" if hold_reason else ""
    _emit(args, f"{queue_id}{held}\n",
          {"queue_id": queue_id, "message_id": _message_id(body),
           "held": hold_reason is not None, "daemon_signalled": woke})
    return EXIT_OK


def _message_id(message: bytes) -> str | None:
    """The message's Message-ID, so a caller can find it at the far end (a fleet change's
    probe message); None when it has none."""
    found = BytesHeaderParser().parsebytes(message).get("Message-ID")
    return str(found).strip() if found else None


# ---------------------------------------------------------------------------------------------
# Helpers


def build_message(sender: str, recipients: list[str], subject: str, host: str) -> bytes:
    """A minimal RFC 5322 message for ``deliverd send`` without a file."""
    headers = [
        f"From: <{sender}>" if sender else f"From: MAILER-DAEMON@{host}",
        "To: " + ", ".join(f"<{r}>" for r in recipients),
        f"Subject: {subject}",
        f"Date: {formatdate(localtime=True)}",
        f"Message-ID: {make_msgid(domain=host)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    text = "\r\n".join(headers) + f"\r\n\r\nTest message queued by deliverd send on {host}.\r\n"
    return text.encode("utf-8")


_LINE_END = re.compile(rb"\r?\n")
_BAD_ADDRESS = re.compile(r"[\s<>]")


def to_crlf(data: bytes) -> bytes:
    """The queue stores SMTP's line ending; files and stdin usually have bare LF."""
    return _LINE_END.sub(b"\r\n", data)


def _check_addresses(sender: str, recipients: list[str]) -> str | None:
    if sender and (_BAD_ADDRESS.search(sender) or "@" not in sender):
        return f"invalid sender address {sender!r}"
    for rcpt in recipients:
        if not rcpt or _BAD_ADDRESS.search(rcpt) or "@" not in rcpt:
            return f"invalid recipient address {rcpt!r}"
    return None


def _closing(db: QueueDB, op: Callable[[], _T]) -> _T:
    with db:
        return op()


def _unknown(queue_id: str) -> int:
    print(f"deliverd: {queue_id}: no such message in the queue", file=sys.stderr)
    return EXIT_UNKNOWN_ID


def _woke(woke: bool) -> str:
    return "; daemon signalled" if woke else ""
