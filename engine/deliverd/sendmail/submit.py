"""One message from a local program into the maildrop: ``sendmail``'s work, and ``-bs``'s DATA.

The message is read by ``MessageInput``, its recipients are the arguments' and, with ``-t``,
the header's, resolved by the local address rules (``LocalRules``: aliases, qualification,
masquerading of the envelope sender); ``complete_header`` adds From:, Date: and Message-ID:
where they are missing, and ``dropfile`` writes the file. The header is not rewritten here:
the pickup rewrites it (masquerading From:/Sender:, qualifying To:/Cc:/Bcc:) with the running
config, as it does for every drop file.
"""

from __future__ import annotations

from deliverd.queue.space import min_free_bytes
from deliverd.sendmail.command_line import EX_DATAERR, EX_NOUSER, EX_OK, Failure
from deliverd.sendmail.header_recipients import header_recipients
from deliverd.submission.dropfile import DropError, envelope_line, poke, write_drop
from deliverd.submission.local_addresses import LocalRules, UnknownLocalUser
from deliverd.submission.message_input import MessageInput, complete_header, submitting_user

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from deliverd.config.sendmail_settings import SendmailSettings
    from deliverd.sendmail.command_line import Options
    from deliverd.submission.message_input import LineSource


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
