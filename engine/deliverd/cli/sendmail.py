"""``deliverd sendmail`` (installed as ``sendmail`` and ``mailq``): the host's sendmail interface.

What cron, PHP's mail(), git send-email, mailx and Symfony run. The message goes into the
maildrop (``deliverd.submission.maildrop``), so it works for any local user while the daemon
is up or down, with no setuid and no secrets: only the world-readable ``deliverd.toml`` is read.
Flags as Postfix's sendmail takes them: ``-t`` adds the To:, Cc: and Bcc: recipients to the
arguments' and removes Bcc:, ``-i``/``-oi`` (a lone "." does not end the message), ``-f``/``-r``
sender, ``-F`` full name, ``-bs`` SMTP on stdin/stdout, ``-bp`` list the queue (= ``mailq``),
``-bm`` (the default), ``-N``/``-R``/``-V`` (RFC 3461), ``-B`` (8-bit is detected anyway),
``-q`` flush, ``-C FILE`` the config; ``-o…``, ``-od…`` and the other old flags are ignored.

Exit codes (sysexits): 0 ok, 64 usage, 65 bad message or no recipient, 67 a local user
without an alias, 69 the queue cannot be listed (daemon down), 73 the maildrop cannot be
written, 74 I/O error, 75 the queue's filesystem is short of space (try again), 77 not
allowed, 78 the config cannot be read.

The common invocations (cron, PHP, mailx, git send-email) never get here: the launcher runs
``deliverd.cli.sendmail_fast``, which hands this module what it does not take itself (``-bs``,
``-bp``, ``-q``, ``-N``/``-R``/``-V``, errors that need the full reporting) with whatever it read of
stdin already; see that module for the import path (``python -X importtime``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

# One refusal class for both paths: the fast one runs first and is always loaded already.
from deliverd.cli.sendmail_fast import Failure
from deliverd.config.convert import local_from_spec, masquerade_from_spec
from deliverd.core.units import parse_size
from deliverd.queue.space import min_free_bytes
from deliverd.submission.local import (
    LocalPolicy,
    UnknownLocalUser,
    header_addresses,
    local_policy,
)
from deliverd.submission.maildrop import (
    DropEnvelope,
    DropError,
    poke,
    waiting_in_maildrop,
    write_drop,
)
from deliverd.submission.message_input import (
    InputError,
    MessageInput,
    TooBig,
    complete_header,
    submitting_user,
)

if TYPE_CHECKING:
    from deliverd.submission.message_input import LineSource

DEFAULT_CONFIG = "/etc/deliverd/deliverd.toml"
CONFIG_ENV = "DELIVERD_CONFIG"

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Flags that take a value, in the same argument (-fuser) or the next one (-f user).
_WITH_VALUE = frozenset("fFrCNRVBLhOXpb")
# Flags accepted and ignored (old sendmail options no caller here depends on).
_IGNORED = frozenset("GUvmnx")
_NOTIFY = frozenset({"success", "failure", "delay"})


@dataclass
class Options:
    mode: str = "send"  # send | smtp | list | flush
    recipients: list[str] = field(default_factory=list)
    header_recipients: bool = False
    dot_ends: bool = True
    sender: str | None = None
    fullname: str | None = None
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    config: str | None = None


def parse_args(argv: Sequence[str]) -> Options:
    """Options from a sendmail command line; ``Failure(64)`` for what it cannot mean."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients += args
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        _parse_flags(arg[1:], args, opts)
    return opts


def _parse_flags(flags: str, rest: list[str], opts: Options) -> None:
    while flags:
        flag, flags = flags[0], flags[1:]
        if flag == "o":  # -oi means -i; every other -oX (-oem, -odb, -oQ...) is ignored
            if flags == "i":
                opts.dot_ends = False
            return
        if flag == "q":  # -q, -q30m, -qR...: run the queue now
            opts.mode = "flush"
            return
        if flag in _WITH_VALUE:
            value = flags or (rest.pop(0) if rest else None)
            if value is None:
                raise Failure(EX_USAGE, f"option -{flag} needs a value")
            _apply_value(flag, value, opts)
            return
        if flag == "t":
            opts.header_recipients = True
        elif flag == "i":
            opts.dot_ends = False
        elif flag not in _IGNORED:
            raise Failure(EX_USAGE, f"unknown option -{flag}")


def _apply_value(flag: str, value: str, opts: Options) -> None:
    if flag in "fr":
        opts.sender = value
    elif flag == "F":
        opts.fullname = value
    elif flag == "C":
        opts.config = value
    elif flag == "b":
        modes = {"m": "send", "s": "smtp", "p": "list"}
        if value not in modes:
            raise Failure(EX_USAGE, f"-b{value} is not supported (only -bm, -bs and -bp)")
        opts.mode = modes[value]
    elif flag == "N":
        words = {w.strip().lower() for w in value.split(",")}
        if words != {"never"} and not words <= _NOTIFY:
            raise Failure(EX_USAGE, "-N takes never, or some of success,failure,delay")
        opts.notify = ",".join(sorted(words)).upper()
    elif flag == "R":
        if value.lower() not in ("hdrs", "full"):
            raise Failure(EX_USAGE, "-R takes hdrs or full")
        opts.ret = value.upper()
    elif flag == "V":
        # RFC 3461 §4.4: printable US-ASCII, at most 100 characters as xtext, where space, "+"
        # and "=" take three. deliverd.core.dsn_params.check_envid says the same at pickup
        # (anyone may write a drop file); not imported here: it costs this path milliseconds.
        xtext_len = len(value) + 2 * sum(c in " +=" for c in value)
        if not value or xtext_len > 100 or not (value.isascii() and value.isprintable()):
            raise Failure(EX_USAGE, "-V: ENVID must be printable US-ASCII, at most 100"
                                    " characters as xtext")
        opts.envid = value
    # -B (body type), -L, -h, -O, -X, -p: accepted, nothing to do


# ---------------------------------------------------------------------------------------------
# The config: only the world-readable file, never the secrets


@dataclass(frozen=True)
class Settings:
    queue_path: str
    host_name: str
    policy: LocalPolicy
    max_message_size: int


def config_path(opts: Options) -> str:
    return opts.config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_settings(path: str) -> Settings:
    import tomllib

    try:
        with open(path, "rb") as fh:
            tree = tomllib.loads(fh.read().decode("utf-8"))
    except OSError as exc:
        raise Failure(EX_CONFIG, f"{path}: cannot read the config: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Failure(EX_CONFIG, f"{path}: not a valid config: {exc}") from None
    try:
        if "local" not in tree or "masquerade" not in tree:
            # Rendered before these keys existed: fill their defaults the one way there is.
            from deliverd.spec.normalise import normalise

            tree = normalise(tree)
        return Settings(
            queue_path=str(tree["queue"]["path"]),
            host_name=str(tree["host"]["name"]),
            policy=local_policy(local_from_spec(tree["local"]),
                                masquerade_from_spec(tree["masquerade"])),
            max_message_size=parse_size(tree["limits"]["max_message_size"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Failure(EX_CONFIG, f"{path}: not a rendered deliverd config "
                                 f"(check it with: deliverd check-config {path})") from None


# ---------------------------------------------------------------------------------------------
# Submitting


def _clean(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if any(ch.isspace() for ch in address) or "<" in address or ">" in address:
        raise Failure(EX_DATAERR, f"bad address syntax: {address!r}")
    return address


def _resolve(policy: LocalPolicy, addresses: list[str]) -> list[str]:
    try:
        return policy.resolve_recipients(addresses)
    except UnknownLocalUser as exc:
        raise Failure(EX_NOUSER, str(exc)) from None


def _drop(settings: Settings, envelope: DropEnvelope, header: bytes,
          body: Iterator[bytes]) -> str:
    def chunks() -> Iterator[bytes]:
        yield header + b"\r\n"
        yield from body

    try:
        name = write_drop(settings.queue_path, envelope, chunks(),
                          min_free=min_free_bytes(settings.max_message_size))
    except DropError as exc:
        raise Failure(exc.exit_code, str(exc)) from None
    poke(settings.queue_path)
    return name


def send(opts: Options, settings: Settings, stdin: LineSource) -> int:
    policy = settings.policy
    login, gecos = submitting_user()
    sender = policy.sender(_clean(opts.sender) if opts.sender is not None else login)
    recipients = [_clean(r) for r in opts.recipients for r in r.split(",") if r.strip()]
    source = MessageInput(stdin, dot_ends=opts.dot_ends, smtp=False,
                    max_size=settings.max_message_size)
    header = source.header()
    if opts.header_recipients:
        recipients += [_clean(a) for a in header_addresses(header, ("to", "cc", "bcc"))]
    if not recipients:
        raise Failure(EX_DATAERR, "no recipients: none given as arguments"
                      + (" and none in To:, Cc: or Bcc:" if opts.header_recipients
                         else " (use -t to read them from the message)"))
    resolved = _resolve(policy, recipients)
    header = complete_header(header, sender=sender, fullname=opts.fullname or gecos,
                             domain=policy.qualify_domain or settings.host_name,
                             drop_bcc=opts.header_recipients)
    header = policy.rewrite_headers(header)
    envelope = DropEnvelope(sender, tuple(resolved), opts.notify, opts.ret, opts.envid)
    _drop(settings, envelope, header, source.body())
    return EX_OK


# ---------------------------------------------------------------------------------------------
# -bs: an SMTP dialogue on stdin and stdout


class _Session:
    def __init__(self, settings: Settings, stdin: LineSource, stdout: BinaryIO) -> None:
        self.settings = settings
        self.stdin = stdin
        self.stdout = stdout
        self.sender: str | None = None
        self.recipients: list[str] = []

    def reply(self, text: str) -> None:
        self.stdout.write(text.encode("utf-8") + b"\r\n")
        self.stdout.flush()

    def run(self) -> int:
        host = self.settings.host_name
        self.reply(f"220 {host} ESMTP deliverd")
        while True:
            raw = self.stdin.readline()
            if not raw:
                return EX_OK
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            verb, _, arg = line.partition(" ")
            handler = getattr(self, f"smtp_{verb.upper()}", None)
            if handler is None:
                self.reply("502 5.5.2 Error: command not recognized")
            elif handler(arg.strip()) is False:
                return EX_OK

    def smtp_HELO(self, arg: str) -> None:
        self.reply(f"250 {self.settings.host_name}")

    def smtp_EHLO(self, arg: str) -> None:
        host = self.settings.host_name
        for text in (f"250-{host}", f"250-SIZE {self.settings.max_message_size}",
                     "250-8BITMIME", "250-SMTPUTF8", "250 ENHANCEDSTATUSCODES"):
            self.reply(text)

    def smtp_MAIL(self, arg: str) -> None:
        if not arg.upper().startswith("FROM:"):
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            address = _clean(arg[5:].strip().split(" ", 1)[0] or "<>")
        except Failure:
            self.reply("501 5.1.7 Bad sender address syntax")
            return
        self.sender = self.settings.policy.sender(address)
        self.recipients = []
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        if not arg.upper().startswith("TO:"):
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            address = _clean(arg[3:].strip().split(" ", 1)[0])
            self.recipients += [r for r in self.settings.policy.resolve_recipient(address)
                                if r not in self.recipients]
        except Failure:
            self.reply("501 5.1.3 Bad recipient address syntax")
        except UnknownLocalUser as exc:
            self.reply(exc.smtp_reply)
        else:
            self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, arg: str) -> None:
        if self.sender is None or not self.recipients:
            self.reply("554 5.5.1 Error: no valid recipients")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        settings, policy = self.settings, self.settings.policy
        source = MessageInput(self.stdin, dot_ends=True, smtp=True,
                        max_size=settings.max_message_size)
        try:
            header = complete_header(source.header(), sender=self.sender, fullname=None,
                                     domain=policy.qualify_domain or settings.host_name,
                                     drop_bcc=False)
            envelope = DropEnvelope(self.sender, tuple(self.recipients))
            name = _drop(settings, envelope, policy.rewrite_headers(header), source.body())
        except (Failure, InputError) as exc:
            if not source.ended:
                _drain(source)
            code = exc.code if isinstance(exc, Failure) else exc.exit_code
            status = ("552 5.3.4" if isinstance(exc, TooBig)
                      else "452 4.3.1" if code == EX_TEMPFAIL else "554 5.3.0")
            self.reply(f"{status} Error: {exc}")
        else:
            self.reply(f"250 2.0.0 Ok: queued as {name}")
        self.sender, self.recipients = None, []

    def smtp_RSET(self, arg: str) -> None:
        self.sender, self.recipients = None, []
        self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> None:
        self.reply("252 2.0.0 Send some mail, I'll try my best")

    def smtp_QUIT(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False


def _drain(source: MessageInput) -> None:
    """Read the rest of a refused DATA so the dialogue stays in step."""
    source.max_size = sys.maxsize
    try:
        while source.line() is not None:
            pass
    except InputError:
        pass


# ---------------------------------------------------------------------------------------------
# -bp and -q


def list_queue(settings: Settings) -> int:
    from deliverd.cli.queue import format_table
    from deliverd.queue.showq import ShowqUnavailable, read_queue

    try:
        messages = read_queue(settings.queue_path)
    except ShowqUnavailable as exc:
        raise Failure(EX_UNAVAILABLE, f"queue report unavailable: {exc}") from None
    sys.stdout.write(format_table(messages))
    waiting = waiting_in_maildrop(settings.queue_path)
    if waiting:
        sys.stdout.write(f"-- {waiting} more in the maildrop, not yet queued "
                         "(the daemon takes them in when it runs)\n")
    return EX_OK


def flush_queue(settings: Settings) -> int:
    from deliverd.cli.queue import wake_daemon
    from deliverd.queue.database import QueueDB, QueueError, QueueMissingError

    try:
        db = QueueDB.open(settings.queue_path, create=False)
    except QueueMissingError:
        return EX_OK
    except (QueueError, OSError) as exc:
        raise Failure(EX_NOPERM, f"only the queue's owner can flush it ({exc})") from None
    with db:
        db.flush()
    wake_daemon(settings.queue_path)
    return EX_OK


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str], prog: str = "sendmail", stdin: LineSource | None = None) -> int:
    """``sendmail ARGS``; ``stdin`` is where the message or the ``-bs`` dialogue is read
    (``deliverd.cli.sendmail_fast`` hands over what it read already this way)."""
    stream = sys.stdin.buffer if stdin is None else stdin
    try:
        opts = parse_args(argv)
        settings = load_settings(config_path(opts))
        if opts.mode == "list":
            return list_queue(settings)
        if opts.mode == "flush":
            return flush_queue(settings)
        if opts.mode == "smtp":
            return _Session(settings, stream, sys.stdout.buffer).run()
        return send(opts, settings, stream)
    except Failure as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except InputError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def entry(prog: str, argv: Sequence[str]) -> int:
    """``sendmail ARGS`` and ``mailq ARGS`` (= ``sendmail -bp``) by the name they were run as."""
    if prog == "mailq":
        return main(["-bp", *argv], prog)
    return main(argv, prog)
