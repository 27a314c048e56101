"""One message from a local program into the maildrop: ``sendmail``'s work, and ``-bs``'s DATA.

The message is read by ``MessageInput``, its recipients are the arguments' and, with ``-t``,
the header's, resolved by the local address rules (``LocalRules``: aliases, qualification,
masquerading of the envelope sender); ``complete_header`` adds From:, Date: and Message-ID:
where they are missing, and ``dropfile`` writes the file. The header is not rewritten here:
the pickup rewrites it (masquerading From:/Sender:, qualifying To:/Cc:/Bcc:) with the running
config, as it does for every drop file.

``-t``'s addresses written plainly (``a@b``, ``Name <a@b>``, lists of those) are read here as
the email package's parser reads them; anything else (quotes, comments, groups, non-ASCII) is
read by that parser (``deliverd.submission.local.header_addresses``), imported only then: it
costs a run more than the rest of it. (Here rather than in a module of their own: every module
on a run's import path costs it a file lookup and a load.)
"""

from __future__ import annotations

from deliverd.sendmail.command_line import EX_DATAERR, EX_NOUSER, EX_OK, Failure
from deliverd.submission.dropfile import DropError, envelope_line, poke, write_drop
from deliverd.submission.local_addresses import LocalRules, UnknownLocalUser
from deliverd.submission.message_input import (
    MessageInput,
    complete_header,
    split_fields,
    submitting_user,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from deliverd.config.config_file import SendmailSettings
    from deliverd.sendmail.command_line import Options
    from deliverd.submission.message_input import LineSource


def min_free_bytes(max_message_size: int) -> int:
    """``deliverd.queue.space.min_free_bytes``, the reserve every way in keeps, written out
    again: importing ``deliverd.queue`` would cost every run two module loads
    (``tests/unit/cli/test_sendmail_fast.py`` holds the two to the same answer)."""
    return max_message_size * 3 // 2 + 8 * 1024 * 1024


def local_rules(settings: SendmailSettings) -> LocalRules:
    return LocalRules(settings.domains, settings.qualify_domain, settings.aliases,
                      settings.masquerade_domain, settings.except_users)


def clean(address: str) -> str:
    """An address as given (``<a@b>`` or ``a@b``); ``Failure(65)`` for one with spaces or
    brackets inside."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if any(ch.isspace() for ch in address) or "<" in address or ">" in address:
        raise Failure(EX_DATAERR, f"bad address syntax: {address!r}")
    return address


def resolve(rules: LocalRules, addresses: Sequence[str]) -> list[str]:
    try:
        return rules.resolve_recipients(addresses)
    except UnknownLocalUser as exc:
        raise Failure(EX_NOUSER, str(exc)) from None


def send(opts: Options, settings: SendmailSettings, stdin: LineSource) -> int:
    """``sendmail [-t] ... RECIPIENT...``: the message on ``stdin`` into the maildrop."""
    rules = local_rules(settings)
    login, gecos = submitting_user()
    sender = rules.sender(clean(opts.sender) if opts.sender is not None else login)
    recipients = [clean(r) for r in opts.recipients for r in r.split(",") if r.strip()]
    source = MessageInput(stdin, dot_ends=opts.dot_ends, smtp=False,
                          max_size=settings.max_message_size)
    header = source.header()
    if opts.header_recipients:
        recipients += [clean(a) for a in header_recipients(header)]
    if not recipients:
        raise Failure(EX_DATAERR, "no recipients: none given as arguments"
                      + (" and none in To:, Cc: or Bcc:" if opts.header_recipients
                         else " (use -t to read them from the message)"))
    resolved = resolve(rules, recipients)
    header = complete_header(header, sender=sender, fullname=opts.fullname or gecos,
                             domain=rules.qualify_domain or settings.host_name,
                             drop_bcc=opts.header_recipients)
    drop(settings, envelope_line(sender, resolved, opts.notify, opts.ret, opts.envid), header,
         source.body())
    return EX_OK


def drop(settings: SendmailSettings, envelope: bytes, header: bytes,
         body: Iterator[bytes]) -> str:
    """The message into the maildrop, the daemon told; returns the drop file's name."""
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


# ---------------------------------------------------------------------------------------------
# -t


_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+/=?^_`{|}~-.")
_TO_FIELDS = ("to", "cc", "bcc")


def header_recipients(header: bytes) -> list[str]:
    """The addresses of To:, Cc: and Bcc:, in order."""
    found = plain_addresses(header)
    if found is None:
        from deliverd.submission.local import header_addresses

        found = header_addresses(header, _TO_FIELDS)
    return found


def plain_addresses(header: bytes) -> list[str] | None:
    """The addresses of To:, Cc: and Bcc: when they are written plainly; None for anything
    else."""
    found: list[str] = []
    for raw in split_fields(header):
        name, _, rest = raw.partition(b":")
        if name.decode("ascii").lower() not in _TO_FIELDS:
            continue
        value = rest.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
        if not value.isascii() or any(c in '"()\\;:[]' for c in value):
            return None
        for part in value.split(","):
            address = _address(part.strip(" \t"))
            if address is None:
                return None
            if address:
                found.append(address)
    return found


def _address(part: str) -> str | None:
    """The address of one list item ('' for an empty one), None when it is not plain."""
    if "<" in part or ">" in part:
        phrase, _, rest = part.partition("<")
        address, closed, tail = rest.partition(">")
        address = address.strip(" \t")
        if not closed or tail or "<" in rest or ">" in phrase or "@" in phrase or not address:
            return None
    else:
        address = part
    if not address:
        return ""
    local, at, domain = address.partition("@")
    if (any(c not in _ATEXT for c in local + domain) or not local
            or (at and not domain) or "@" in domain):
        return None
    return address
