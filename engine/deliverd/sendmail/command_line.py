"""A ``sendmail`` command line, as Postfix's sendmail takes it, and the exit codes of a run.

``-t`` adds the To:, Cc: and Bcc: recipients to the arguments' and removes Bcc:, ``-i``/``-oi``
(a lone "." does not end the message), ``-f``/``-r`` sender, ``-F`` full name, ``-bs`` SMTP on
stdin/stdout, ``-bp`` list the queue (= ``mailq``), ``-bm`` (the default), ``-N``/``-R``/``-V``
(RFC 3461), ``-B`` (8-bit is detected anyway), ``-q`` flush, ``-C FILE`` the config; ``-o…``,
``-od…`` and the other old flags are ignored. No imports: it is on every run's path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# sysexits.h: 0 ok, 64 usage, 65 bad message or no recipient, 67 a local user without an alias,
# 69 the queue cannot be listed (daemon down), 73 the maildrop cannot be written, 74 I/O error,
# 75 the queue's filesystem is short of space (try again), 77 not allowed, 78 the config.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# Flags that take a value, in the same argument (-fuser) or the next one (-f user).
_WITH_VALUE = frozenset("fFrCNRVBLhOXpb")
# Flags accepted and ignored (old sendmail options no caller here depends on).
_IGNORED = frozenset("GUvmnx")
_NOTIFY = frozenset({"success", "failure", "delay"})
_MODES = {"m": "send", "s": "smtp", "p": "list"}


class Failure(Exception):
    """The run ends with ``code`` and this message on stderr."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class Options:
    """What a command line asks for; ``mode`` is send, smtp (-bs), list (-bp) or flush (-q)."""

    def __init__(self, *, mode: str = "send", recipients: list[str] | None = None,
                 header_recipients: bool = False, dot_ends: bool = True,
                 sender: str | None = None, fullname: str | None = None,
                 notify: str | None = None, ret: str | None = None, envid: str | None = None,
                 config: str | None = None) -> None:
        self.mode = mode
        self.recipients = [] if recipients is None else recipients
        self.header_recipients = header_recipients
        self.dot_ends = dot_ends
        self.sender = sender
        self.fullname = fullname
        self.notify = notify
        self.ret = ret
        self.envid = envid
        self.config = config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Options) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"Options({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


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
        if value not in _MODES:
            raise Failure(EX_USAGE, f"-b{value} is not supported (only -bm, -bs and -bp)")
        opts.mode = _MODES[value]
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
