"""The SMTP handshake: connect, greeting, EHLO, TLS by plan, AUTH. One copy, two callers.

Delivery (``transport.Transport``) and the smart host preflight (``delivery.probe``) both
establish their sessions here, so every STARTTLS and AUTH decision is made by the same code:
a probe that passes went through exactly what a delivery goes through. The probe watches the
steps through a ``StepReport`` (``connect``, ``tls``, ``ehlo``, ``auth``, each passed with a
one-line detail, or the one that failed); delivery passes none.

Failures raise ``SessionError`` like every other session step. Two decisions that follow a
failure are here too, for the same reason: whether a broken TLS handshake is retried in clear
text (``retries_in_clear``: opportunistic TLS only, as Postfix ``may``), and how a session that
failed is closed (``close_after_failure``). No detail carries a password: AUTH is exchanged by
``SmtpSession``, which redacts it, and every text is built from replies and local conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from deliverd.config.model import Config, Credentials
from deliverd.core.outcomes import SessionFailure, Stage
from deliverd.smtp.dane import verify as dane_verify
from deliverd.smtp.errors import (
    STATUS_AUTH,
    STATUS_TLS_FAILED,
    STATUS_TLS_NOT_OFFERED,
    SessionError,
    failure_from_reply,
)
from deliverd.smtp.policy import choose_mechanism, may_authenticate
from deliverd.smtp.session import SmtpSession
from deliverd.smtp.tls import ContextCache, StartTls, TlsMode, TlsPlan, starttls_decision


class StepReport(Protocol):
    """Told of each handshake step as it passes or fails (the probe's report)."""

    def ok(self, name: str, detail: str) -> None: ...

    def fail(self, name: str, detail: str) -> None: ...


class _Silent:
    def ok(self, name: str, detail: str) -> None:
        pass

    def fail(self, name: str, detail: str) -> None:
        pass


@dataclass(frozen=True)
class Handshake:
    """What a session must do before its first MAIL: TLS per ``plan``, then AUTH with
    ``credentials`` (none: no AUTH), which clear text permits only with
    ``allow_plaintext_auth``."""

    plan: TlsPlan
    credentials: Credentials | None = None
    allow_plaintext_auth: bool = False

    @classmethod
    def for_config(
        cls, plan: TlsPlan, credentials: Credentials | None, cfg: Config
    ) -> Handshake:
        """The handshake under ``cfg`` (narrowed to the hop's route: its smart host rules)."""
        smarthost = cfg.routing.smarthost
        plaintext = smarthost is not None and smarthost.allow_plaintext_auth
        return cls(plan, credentials, plaintext)

    def in_clear(self) -> Handshake:
        """The same handshake without STARTTLS: the retry ``retries_in_clear`` allows."""
        return replace(self, plan=replace(self.plan, mode=TlsMode.NONE))


async def establish(
    session: SmtpSession,
    handshake: Handshake,
    contexts: ContextCache,
    report: StepReport | None = None,
) -> None:
    """Connect, greet, EHLO, TLS and AUTH on ``session``; ``SessionError`` at the first
    failure, after ``report`` was told which step failed."""
    steps = _Steps(report or _Silent())
    try:
        await _greet(session, handshake.plan, contexts, steps)
        steps.current = "tls"
        await _secure(session, handshake.plan, contexts, steps)
        if handshake.credentials is not None:
            steps.current = "auth"
            await _authenticate(session, handshake, steps)
    except SessionError as err:
        steps.report.fail(steps.current, failure_text(err.failure))
        raise


def retries_in_clear(failure: SessionFailure, plan: TlsPlan) -> bool:
    """A TLS handshake that broke (no reply: not a refusal) is tried once more in clear text,
    and only when TLS was opportunistic."""
    return (
        failure.stage is Stage.STARTTLS
        and failure.reply is None
        and plan.may_fall_back_to_clear
    )


async def close_after_failure(session: SmtpSession, failure: SessionFailure) -> None:
    """After a reply the dialogue is in step and a QUIT is polite; after a local error
    (timeout, garbage, dropped connection) it is not, so just close."""
    if failure.reply is not None or failure.loop:
        await session.quit()
    else:
        session.abort()


def failure_text(failure: SessionFailure) -> str:
    return f"{failure.error} [{failure.status}]"


# -- the steps -------------------------------------------------------------------------------


@dataclass
class _Steps:
    report: StepReport
    current: str = "connect"

    def ok(self, detail: str) -> None:
        self.report.ok(self.current, detail)


async def _greet(
    session: SmtpSession, plan: TlsPlan, contexts: ContextCache, steps: _Steps
) -> None:
    implicit = plan.mode is TlsMode.IMPLICIT
    await session.open(contexts.get(plan) if implicit else None)
    greeting = session.transcript[0][4:].split("\n", 1)[0] if session.transcript else ""
    steps.ok(f"{session.hop.relay}: {greeting}")
    if implicit:
        steps.current = "tls"
        steps.ok(_tls_detail(session, plan))
    steps.current = "ehlo"
    await session.hello()
    steps.ok(" ".join(sorted(k.upper() for k in session.features)) or "(none)")


async def _secure(
    session: SmtpSession, plan: TlsPlan, contexts: ContextCache, steps: _Steps
) -> None:
    """STARTTLS as the plan asks; opportunistic and refused carries on in clear, as Postfix."""
    decision = starttls_decision(plan, "starttls" in session.features, session.tls_active)
    if decision is StartTls.FAIL:
        raise SessionError(SessionFailure(
            Stage.STARTTLS,
            f"TLS is required, but STARTTLS was not offered by {session.hop.relay}",
            status=STATUS_TLS_NOT_OFFERED,
        ))
    if decision is StartTls.SKIP:
        if plan.mode is not TlsMode.IMPLICIT:  # implicit TLS was reported with the greeting
            why = "tls: none" if plan.mode is TlsMode.NONE else "not offered (opportunistic)"
            steps.ok(f"not used: {why}")
        return
    reply = await session.starttls(contexts.get(plan))
    if reply.code != 220:
        if plan.mode is TlsMode.REQUIRED:
            refused = failure_from_reply(Stage.STARTTLS, reply)
            raise SessionError(replace(refused, temporary=True, status=STATUS_TLS_NOT_OFFERED))
        steps.ok(f"STARTTLS refused ({reply}); continuing in clear (opportunistic)")
        return
    if plan.dane:
        _check_dane(session, plan)
    steps.ok(_tls_detail(session, plan))
    await session.hello()  # RFC 3207: forget what was learnt before TLS


async def _authenticate(session: SmtpSession, handshake: Handshake, steps: _Steps) -> None:
    creds = handshake.credentials
    assert creds is not None
    if not may_authenticate(session.tls_active, handshake.allow_plaintext_auth):
        raise SessionError(SessionFailure(
            Stage.AUTH, "refusing to send credentials without TLS", status="4.7.0"
        ))
    mechanism = choose_mechanism(session.auth_mechanisms)
    if mechanism is None:
        offered = " ".join(session.auth_mechanisms) or "none"
        raise SessionError(SessionFailure(
            Stage.AUTH,
            f"no usable AUTH mechanism offered by {session.hop.relay} (offered: {offered})",
            status=STATUS_AUTH,
        ))
    await session.authenticate(creds, mechanism)
    steps.ok(f"AUTH {mechanism} accepted as {creds.username}")


def _check_dane(session: SmtpSession, plan: TlsPlan) -> None:
    """RFC 7672: the chain must match a usable TLSA record, or no mail goes over it."""
    verdict = dane_verify(plan.dane, session.peer_chain(), [session.hop.host])
    session.note(f"--- {verdict.reason}")
    if not verdict.ok:
        raise SessionError(SessionFailure(
            Stage.STARTTLS, f"{verdict.reason} at {session.hop.relay}", status=STATUS_TLS_FAILED
        ))


def _tls_detail(session: SmtpSession, plan: TlsPlan) -> str:
    version = session.tls_version or "TLS"
    if plan.dane:
        return f"{version} certificate matched a TLSA record of {session.hop.host}"
    if plan.verify:
        return f"{version} certificate verified for {session.hop.host}"
    return f"{version} (certificate not verified)"
