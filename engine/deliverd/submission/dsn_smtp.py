"""The DSN SMTP extension (RFC 3461) on aiosmtpd's protocol, for the listener.

aiosmtpd upper-cases every MAIL and RCPT parameter (ENVID and ORCPT are case-sensitive
xtext) and refuses the ones it does not know, so ``DsnSMTP`` takes RET and ENVID, NOTIFY and
ORCPT out of the command, checked by ``deliverd.core.dsn_params`` (501 5.5.4 when malformed),
before aiosmtpd reads the rest. What was asked is kept on the ``DsnEnvelope``: RET and ENVID
per message, NOTIFY and ORCPT per recipient address the RCPT became (after aliases, see
``keep_rcpt_dsn``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import TypeVar

from aiosmtpd.smtp import SMTP, Envelope

from deliverd.core.dsn_params import (
    DsnSyntaxError,
    MailDsn,
    RcptDsn,
    orcpt_of,
    parse_mail_params,
    parse_rcpt_params,
)

_D = TypeVar("_D", MailDsn, RcptDsn)

# RFC 3461 §5: RET and ENVID lengthen MAIL by up to 110 characters, NOTIFY and ORCPT RCPT by 500.
MAIL_EXTRA = 110
RCPT_EXTRA = 500


class DsnEnvelope(Envelope):
    """aiosmtpd's envelope with what RFC 3461 parameters asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn = MailDsn()
        self.notify: dict[str, str] = {}  # recipient address -> NOTIFY
        self.orcpt: dict[str, str] = {}  # recipient address -> ORCPT (type;address)


class DsnSMTP(SMTP):
    """aiosmtpd's protocol taking the DSN parameters out of MAIL and RCPT; a handler's
    ``handle_RCPT`` finds those of the RCPT at hand in ``rcpt_dsn``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # On this instance: aiosmtpd's own table is a class attribute shared by every session.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit,
            {"MAIL": SMTP.command_size_limit + MAIL_EXTRA,
             "RCPT": SMTP.command_size_limit + RCPT_EXTRA},
        )
        self.rcpt_dsn = RcptDsn()

    def _create_envelope(self) -> Envelope:
        return DsnEnvelope()

    async def smtp_MAIL(self, arg: str | None) -> None:
        taken = self._dsn_parameters(arg, "FROM:", parse_mail_params)
        if isinstance(taken, str):
            await self.push(taken)
            return
        dsn, rest = taken if taken is not None else (MailDsn(), arg)
        await super().smtp_MAIL(rest)
        envelope = self.envelope
        if isinstance(envelope, DsnEnvelope) and envelope.mail_from is not None:
            envelope.dsn = dsn

    async def smtp_RCPT(self, arg: str | None) -> None:
        taken = self._dsn_parameters(arg, "TO:", parse_rcpt_params)
        if isinstance(taken, str):
            await self.push(taken)
            return
        self.rcpt_dsn, rest = taken if taken is not None else (RcptDsn(), arg)
        try:
            await super().smtp_RCPT(rest)
        finally:
            self.rcpt_dsn = RcptDsn()

    def _dsn_parameters(
        self, arg: str | None, keyword: str,
        parse: Callable[[list[str]], tuple[_D, list[str]]],
    ) -> tuple[_D, str] | str | None:
        """(what ``parse`` found, the command without it), a 501 reply, or None when the
        command is left to aiosmtpd as it came (no session, no EHLO, no address)."""
        if arg is None or self.session is None or not self.session.extended_smtp:
            return None
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return None
        address, params = self._getaddr(stripped)
        if address is None or not params:
            return None
        head = stripped[: len(stripped) - len(params)]
        try:
            found, rest = parse(params.split())
        except DsnSyntaxError as exc:
            return exc.reply
        return found, f"{keyword}{head.rstrip()} {' '.join(rest)}".rstrip()


def keep_rcpt_dsn(
    envelope: DsnEnvelope, address: str, targets: Sequence[str], dsn: RcptDsn
) -> None:
    """NOTIFY and ORCPT of one RCPT, for every address it became. An address an alias
    rewrote keeps the RCPT address as its ORCPT when the client gave none (as Postfix does),
    so a later notice names what the client sent to."""
    orcpt = dsn.orcpt
    if orcpt is None and list(targets) != [address]:
        orcpt = orcpt_of(address)
    for target in targets:
        if dsn.notify is not None:
            envelope.notify.setdefault(target, dsn.notify)
        if orcpt is not None:
            envelope.orcpt.setdefault(target, orcpt)
