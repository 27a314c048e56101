"""``sendmail`` for what cron, PHP, mailx and git send-email run, on a short import path.

Every message from those callers starts a new interpreter, so what it imports is paid per
message. This module handles the common invocation (``-t``, ``-i``/``-oi``, ``-f``/``-r``,
``-F``, ``-B…``, ``-o…``/``-od…``, ``-bm``, ``-C``, recipients) with nothing beyond what the
interpreter loads at start-up plus ``pwd``, ``errno`` and ``_json``: the message is read by
``message_input.MessageInput``, the local address rules are ``local_addresses``', and the file
is written by ``dropfile``, the modules the full implementation (``deliverd.cli.sendmail``) uses
too; the config is read by ``sendmail_settings``. Anything else declines to the full
implementation, which then behaves exactly as if it had been run directly (same messages, same
exit codes): ``-bs``, ``-bp``, ``-q``, ``-N``/``-R``/``-V``, unknown or malformed flags, a
config ``sendmail_settings`` is not sure of, a sender or full name that is not plain ASCII,
and ``-t`` headers whose addresses need the ``email`` package's parser (quotes, comments,
groups). When it declines after reading the header, the full implementation reads the same
bytes again.

Two pieces of the full path's work are done differently: the pickup rewrites the header
(masquerading ``From:``/``Sender:``, qualifying ``To:``/``Cc:``/``Bcc:``) with the running config,
as it does for every drop file, and this module adds ``From:``, ``Date:`` and ``Message-ID:``
itself without the ``email`` package. The exit codes stay the command's: 65 (no recipient, too
large), 67 (a local user without an alias), 73/74/75 (storage, reading), 78 (the config, through
the full implementation).

Run as ``python -I -S`` on a launcher that puts the package on ``sys.path`` and calls ``entry``
(the role's wrapper; ``launcher`` writes one), or through ``deliverd sendmail``.
"""

from __future__ import annotations

import posix
import sys
import time

from deliverd.cli.sendmail_settings import Settings, Unsure, read_settings
from deliverd.submission import local_addresses as rules
from deliverd.submission.dropfile import DropError, envelope_line, poke, write_drop
from deliverd.submission.message_input import (
    InputError,
    MessageInput,
    field_names,
    split_fields,
    submitting_user,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from deliverd.submission.message_input import LineSource

DEFAULT_CONFIG = "/etc/deliverd/deliverd.toml"
CONFIG_ENV = "DELIVERD_CONFIG"
WAL_HEADROOM = 8 * 1024 * 1024  # deliverd.queue.space.WAL_HEADROOM (a test keeps them equal)

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67

# Flags this module handles: those with a value, and those ignored; -b only as -bm. Every other
# flag (-bs, -bp, -q, -N, -R, -V, -L, -h, -O, -X, -p, unknown ones) is the full path's.
_WITH_VALUE = frozenset("fFrCB")
_IGNORED = frozenset("GUvmnx")


class Decline(Exception):
    """This invocation is the full implementation's; ``replay`` is what was read of stdin."""

    def __init__(self, why: str, replay: list[bytes] | None = None) -> None:
        self.replay = replay
        super().__init__(why)


class Request:
    """What a sendmail command line asks for (the fields of the full path's ``Options``)."""

    def __init__(self) -> None:
        self.recipients: list[str] = []
        self.header_recipients = False
        self.dot_ends = True
        self.sender: str | None = None
        self.fullname: str | None = None
        self.config: str | None = None


def parse_args(argv: Sequence[str]) -> Request:
    """The request of a command line this module handles; ``Decline`` for any other."""
    request = Request()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            request.recipients += args
            break
        if not arg.startswith("-") or arg == "-":
            request.recipients.append(arg)
            continue
        flags = arg[1:]
        while flags:
            flag, flags = flags[0], flags[1:]
            if flag == "o":  # -oi means -i; every other -oX is ignored
                if flags == "i":
                    request.dot_ends = False
                break
            if flag == "b" and (flags or (args[0] if args else "")) == "m":
                if not flags:
                    args.pop(0)
                break
            if flag in _WITH_VALUE:
                value = flags or (args.pop(0) if args else None)
                if value is None:
                    raise Decline(f"-{flag} without a value")
                if flag in "fr":
                    request.sender = value
                elif flag == "F":
                    request.fullname = value
                elif flag == "C":
                    request.config = value
                break  # -B: the body type, nothing to do
            if flag == "t":
                request.header_recipients = True
            elif flag == "i":
                request.dot_ends = False
            elif flag not in _IGNORED:
                raise Decline(f"-{flag}")
    return request


# ---------------------------------------------------------------------------------------------
# The message


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SPECIALS = frozenset('[]\\()<>@,:;".')
_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+/=?^_`{|}~-.")
_TO_FIELDS = frozenset({"to", "cc", "bcc"})


def format_date(when: float) -> str:
    """``email.utils.formatdate(when, localtime=True)`` without the email package."""
    tm = time.localtime(when)
    offset = tm.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, rest = divmod(abs(offset), 3600)
    minutes, seconds = divmod(rest, 60)
    zone = f"{sign}{hours:02d}{minutes:02d}" + (f"{seconds:02d}" if seconds else "")
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year:04d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {zone}")


def format_address(name: str, address: str) -> str:
    """``email.utils.formataddr((name, address))`` for an ASCII name."""
    if not name:
        return address
    quote = '"' if any(c in _SPECIALS for c in name) else ""
    name = name.replace("\\", "\\\\").replace('"', '\\"')
    return f"{quote}{name}{quote} <{address}>"


def make_msgid(domain: str) -> str:
    """``email.utils.make_msgid(domain=domain)``: hundredths of a second, pid, 64 random bits."""
    return (f"<{int(time.time() * 100)}.{posix.getpid()}."
            f"{int.from_bytes(posix.urandom(8), 'big')}@{domain}>")


def complete_header(header: bytes, *, sender: str, fullname: str, domain: str,
                    drop_bcc: bool) -> bytes:
    """``message_input.complete_header`` without the email package (ASCII name and sender)."""
    fields = split_fields(header)
    if drop_bcc:
        fields = [f for f in fields if f.split(b":", 1)[0].strip().lower() != b"bcc"]
    names = field_names(b"".join(fields))
    added = []
    if "from" not in names:
        added.append(f"From: {format_address(fullname, sender or 'MAILER-DAEMON')}")
    if "date" not in names:
        added.append(f"Date: {format_date(time.time())}")
    if "message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain)}")
    return b"".join(fields) + "".join(f"{line}\r\n" for line in added).encode("utf-8")


def header_addresses(header: bytes) -> list[str] | None:
    """The addresses of To:, Cc: and Bcc: as ``local.header_addresses`` finds them, when they
    are written plainly (``a@b``, ``Name <a@b>``, lists of those); None for anything else."""
    found: list[str] = []
    for raw in split_fields(header):
        name, _, rest = raw.partition(b":")
        if name.decode("ascii").lower() not in _TO_FIELDS:
            continue
        value = rest.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
        if not value.isascii() or any(c in '"()\\;:[]' for c in value):
            return None
        for part in value.split(","):
            part = part.strip(" \t")
            if "<" in part or ">" in part:
                phrase, _, rest_ = part.partition("<")
                address, closed, tail = rest_.partition(">")
                address = address.strip(" \t")
                if (not closed or tail or "<" in rest_ or ">" in phrase or "@" in phrase
                        or not address):
                    return None
            else:
                address = part
            if not address:
                continue
            local, at, domain = address.partition("@")
            if (any(c not in _ATEXT for c in local + domain) or not local
                    or (at and not domain) or "@" in domain):
                return None
            found.append(address)
    return found


# ---------------------------------------------------------------------------------------------


class _Recorder:
    """stdin's lines as read, kept until the header section is known, so that the full
    implementation can read them again when this module declines."""

    def __init__(self, stream: LineSource) -> None:
        self.stream = stream
        self.lines: list[bytes] | None = []

    def readline(self) -> bytes:
        line = self.stream.readline()
        if self.lines is not None:
            self.lines.append(line)
        return line


class _Replay:
    def __init__(self, lines: list[bytes], stream: LineSource) -> None:
        self.lines = lines
        self.stream = stream

    def readline(self) -> bytes:
        return self.lines.pop(0) if self.lines else self.stream.readline()


class Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


def _clean(address: str) -> str:
    """The full path's ``_clean``; declines where that one fails (it reports the error)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if any(ch.isspace() for ch in address) or "<" in address or ">" in address:
        raise Decline("bad address syntax")
    return address


def send(request: Request, settings: Settings, stdin: LineSource) -> int:
    login, gecos = submitting_user()
    fullname = request.fullname or gecos
    raw_sender = _clean(request.sender) if request.sender is not None else login
    if not (fullname.isascii() and raw_sender.isascii()):
        raise Decline("a sender or full name that is not ASCII")
    sender = rules.sender(raw_sender, settings.domains, settings.qualify_domain,
                          settings.masquerade_domain, settings.except_users)
    if not sender.isascii():  # a non-ASCII domain in the config: the email package's case
        raise Decline("a sender that is not ASCII")
    recipients = [_clean(r) for r in request.recipients for r in r.split(",") if r.strip()]
    recorder = _Recorder(stdin)
    source = MessageInput(recorder, dot_ends=request.dot_ends, smtp=False,
                          max_size=settings.max_message_size)
    header = source.header()
    if request.header_recipients:
        found = header_addresses(header)
        if found is None:
            raise Decline("-t addresses for the email package", recorder.lines)
        recipients += found
    recorder.lines = None
    if not recipients:
        raise Failure(EX_DATAERR, "no recipients: none given as arguments"
                      + (" and none in To:, Cc: or Bcc:" if request.header_recipients
                         else " (use -t to read them from the message)"))
    resolved: list[str] = []
    seen: set[str] = set()
    for address in recipients:
        try:
            targets = rules.resolve_recipient(address, settings.domains,
                                              settings.qualify_domain, settings.aliases)
        except rules.UnknownLocalUser as exc:
            raise Failure(EX_NOUSER, str(exc)) from None
        for target in targets:
            if target.lower() not in seen:
                seen.add(target.lower())
                resolved.append(target)
    header = complete_header(header, sender=sender, fullname=fullname,
                             domain=settings.qualify_domain or settings.host_name,
                             drop_bcc=request.header_recipients)

    def chunks() -> Iterator[bytes]:
        yield header + b"\r\n"
        yield from source.body()

    try:
        write_drop(settings.queue_path, envelope_line(sender, resolved), chunks(),
                   min_free=settings.max_message_size * 3 // 2 + WAL_HEADROOM)
    except DropError as exc:
        raise Failure(exc.exit_code, str(exc)) from None
    poke(settings.queue_path)
    return EX_OK


def _environ(name: str) -> str | None:
    """An environment variable, decoded as ``os.environ`` decodes it (``os`` costs a few
    milliseconds to import under ``python -S``: this path reads ``posix.environ``)."""
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


def _use_config(config: str | None) -> None:
    """Before handing over to the full implementation: the launcher's config, where
    ``DELIVERD_CONFIG`` does not name one, is what it reads too."""
    if config is not None and _environ(CONFIG_ENV) is None:
        import os

        os.environ[CONFIG_ENV] = config


def main(argv: Sequence[str], prog: str = "sendmail", stdin: LineSource | None = None,
         config: str | None = None) -> int:
    """``sendmail ARGS``: here when this module handles it, else by the full implementation.
    ``config``: the config to read when neither ``-C`` nor ``DELIVERD_CONFIG`` names one (the
    launcher's; else the default)."""
    stream = stdin if stdin is not None else sys.stdin.buffer
    try:
        request = parse_args(argv)
        try:
            settings = read_settings(request.config or _environ(CONFIG_ENV) or config
                                     or DEFAULT_CONFIG)
        except Unsure as exc:
            raise Decline(f"the config: {exc}") from None
        return send(request, settings, stream)
    except Decline as declined:
        if declined.replay is not None:
            stream = _Replay(declined.replay, stream)
        _use_config(config)
        from deliverd.cli.sendmail import main as full

        return full(argv, prog, stream)
    except Failure as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except InputError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def entry(prog: str, argv: Sequence[str], config: str | None = None) -> int:
    """``sendmail ARGS`` and ``mailq ARGS`` by the name they were run as; ``config`` as for
    ``main``."""
    if prog == "mailq":
        _use_config(config)
        from deliverd.cli.sendmail import entry as full_entry

        return full_entry(prog, argv)
    return main(argv, prog, config=config)


# Where a venv's interpreter finds its packages when started with -S (site.py is what would add
# them): the venv is the parent of sys.executable's bin/, which -S leaves as it was run.
VENV_PACKAGES = ('"%s/lib/python%d.%d/site-packages" % (sys.executable.rpartition("/bin/")[0], '
                 "*sys.version_info[:2])")


def launcher(python: str, paths: Sequence[str] | None, prog: str, config: str | None = None,
             comment: str | None = None) -> str:
    """A ``sendmail`` (or ``mailq``) program: ``python -I -S`` with the package on ``sys.path``
    (``paths``, or None: the site-packages of the venv ``python`` belongs to), so start-up
    reads no site-packages and runs no console script. The role's wrappers are these."""
    lines = [f"#!{python} -IS"]
    if comment is not None:
        lines.append(f"# {comment}")
    # After the standard library, as site.py puts them: its imports look nowhere else first.
    lines += ["import sys",
              f"sys.path.append({VENV_PACKAGES})" if paths is None
              else f"sys.path += {list(paths)!r}"]
    lines += ["from deliverd.cli.sendmail_fast import entry",
              f"sys.exit(entry({prog!r}, sys.argv[1:]))" if config is None
              else f"sys.exit(entry({prog!r}, sys.argv[1:], {config!r}))", ""]
    return "\n".join(lines)
