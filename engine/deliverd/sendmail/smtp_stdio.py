"""``sendmail -bs``: an SMTP dialogue on stdin and stdout, each DATA a submission into the
maildrop as ``sendmail``'s own (``submit.drop``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, BinaryIO

from deliverd.sendmail.command_line import EX_OK, EX_TEMPFAIL, Failure
from deliverd.sendmail.submit import clean, drop, local_rules
from deliverd.submission.dropfile import envelope_line
from deliverd.submission.local_addresses import UnknownLocalUser
from deliverd.submission.message_input import InputError, MessageInput, TooBig, complete_header

if TYPE_CHECKING:
    from deliverd.config.config_file import SendmailSettings
    from deliverd.submission.message_input import LineSource


class SmtpSession:
    def __init__(self, settings: SendmailSettings, stdin: LineSource, stdout: BinaryIO) -> None:
        self.settings = settings
        self.rules = local_rules(settings)
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
            address = clean(arg[5:].strip().split(" ", 1)[0] or "<>")
        except Failure:
            self.reply("501 5.1.7 Bad sender address syntax")
            return
        self.sender = self.rules.sender(address)
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
            address = clean(arg[3:].strip().split(" ", 1)[0])
            self.recipients += [r for r in self.rules.resolve_recipient(address)
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
        settings = self.settings
        source = MessageInput(self.stdin, dot_ends=True, smtp=True,
                              max_size=settings.max_message_size)
        try:
            header = complete_header(source.header(), sender=self.sender, fullname=None,
                                     domain=self.rules.qualify_domain or settings.host_name,
                                     drop_bcc=False)
            name = drop(settings, envelope_line(self.sender, self.recipients), header,
                        source.body())
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
