"""``deliverd probe``: check from this host that the smart host would take our mail.

The probe walks the same path a smart host delivery takes (docs/delivery.md): resolve the
smart host (address lookup, or MX with ``resolve_mx``), POP-before-SMTP when configured
(before the SMTP session, as the engine does), connect and read the greeting (refusing a loop
to ourselves), EHLO, TLS by policy with verification as configured, AUTH with the global
credentials or those a given account would use, then QUIT. It never sends MAIL. It reuses the
transport's session (``SmtpSession``), TLS policy and AUTH rules, so a passing probe means the
engine's own code got through, not a look-alike.

The result is a list of steps, each ``ok`` with a one-line detail; no detail ever carries a
password (AUTH is exchanged by ``SmtpSession``, which redacts it, and errors are built from
server replies and local conditions only).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from deliverd.config.model import Config, Credentials, SmarthostConfig
from deliverd.core.outcomes import Hop, Route, SessionFailure
from deliverd.delivery.credentials import credentials_for
from deliverd.dns.resolver import (
    Addresses,
    DnsTempFailure,
    MxHosts,
    NoAddresses,
    NoMx,
    NullMx,
    NxDomain,
    Resolver,
)
from deliverd.smtp.errors import SessionError
from deliverd.smtp.policy import choose_mechanism, may_authenticate
from deliverd.smtp.pop3 import PopBeforeSmtp
from deliverd.smtp.session import SmtpSession
from deliverd.smtp.tls import (
    ContextCache,
    StartTls,
    TlsMode,
    TlsPlan,
    plan_for,
    starttls_decision,
)


@dataclass(frozen=True)
class ProbeStep:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, str | bool]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class ProbeReport:
    smarthost: str  # host:port as configured
    steps: tuple[ProbeStep, ...]
    route: str | None = None  # the routes[] entry whose smart host this is; None: routing

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "route": self.route,
            "smarthost": self.smarthost,
            "steps": [step.as_dict() for step in self.steps],
        }

    def as_text(self) -> str:
        where = f" (route {self.route})" if self.route else ""
        lines = [f"smart host {self.smarthost}{where}"]
        lines += [f"  {'ok  ' if s.ok else 'FAIL'} {s.name:8} {s.detail}" for s in self.steps]
        return "\n".join(lines) + "\n"

    def result(self, name: str) -> str:
        """``ok``, ``FAIL`` or ``-`` (not reached, or not needed) for the step ``name``."""
        found = next((s for s in self.steps if s.name == name), None)
        return "-" if found is None else ("ok" if found.ok else "FAIL")


class ProbeConfigError(Exception):
    """The config cannot be probed (no smart host configured, unknown account)."""


@dataclass
class _Steps:
    steps: list[ProbeStep] = field(default_factory=list)

    def ok(self, name: str, detail: str) -> None:
        self.steps.append(ProbeStep(name, True, detail))

    def fail(self, name: str, detail: str) -> None:
        self.steps.append(ProbeStep(name, False, detail))


# -- resolving the smart host (pure interpretation of resolver results) -----------------


@dataclass(frozen=True)
class _Targets:
    hops: tuple[Hop, ...]
    detail: str


def _unresolved(what: str, result: object) -> str:
    if isinstance(result, NxDomain):
        return f"{what}: no such domain"
    if isinstance(result, NullMx):
        return f"{what}: null MX, the domain accepts no mail"
    if isinstance(result, NoAddresses):
        return f"{what}: no A/AAAA records"
    if isinstance(result, DnsTempFailure):
        return f"{what}: temporary DNS failure: {result.reason}"
    return f"{what}: unexpected answer {result!r}"


async def _resolve(sh: SmarthostConfig, resolver: Resolver) -> _Targets | str:
    """The hops to try in order (every host of a failover list), or why there are none."""
    names: list[tuple[int | None, str, int]] = []
    problems: list[str] = []
    for target in sh.targets:
        if not sh.resolve_mx:
            names.append((None, target.host, target.port))
            continue
        mx = await resolver.mx(target.host)
        if isinstance(mx, MxHosts):
            names += [(pref, host, target.port) for pref, host in sorted(mx.records)]
        elif isinstance(mx, NoMx):  # no MX: the host itself, as RFC 5321 implicit MX
            names.append((None, target.host, target.port))
        else:
            problems.append(_unresolved(f"MX lookup for {target.host}", mx))
    hops: list[Hop] = []
    shown: list[str] = []
    for pref, name, port in names:
        found = await resolver.addresses(name)
        if isinstance(found, Addresses):
            hops += [Hop(name, a, port, Route.SMARTHOST, pref) for a in found.addresses]
            label = name if pref is None else f"MX {pref} {name}"
            where = f":{port}" if len(sh.targets) > 1 else ""
            shown.append(f"{label}{where} -> {', '.join(found.addresses)}")
        else:
            problems.append(_unresolved(name, found))
    if not hops:
        return "; ".join(problems)
    return _Targets(tuple(hops), "; ".join(shown))


def _own_addresses(cfg: Config) -> set[str]:
    own = set()
    for text in cfg.host.addresses:
        try:
            own.add(str(ipaddress.ip_address(text)))
        except ValueError:
            continue
    return own


# -- the SMTP part -----------------------------------------------------------------------


def _tls_version(session: SmtpSession) -> str:
    # SmtpSession does not expose its aiosmtplib client; the version is only for the report.
    client = getattr(session, "_smtp", None)
    transport = getattr(client, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return ssl_object.version() or "TLS"
    return "TLS"


def _tls_detail(session: SmtpSession, plan: TlsPlan, host: str) -> str:
    version = _tls_version(session)
    if plan.verify:
        return f"{version} certificate verified for {host}"
    return f"{version} (certificate not verified: verify_tls is false)"


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


async def _smtp_steps(
    hop: Hop, cfg: Config, creds: Credentials | None, steps: _Steps
) -> bool:
    """EHLO, TLS and AUTH on a session that already greeted; False at the first failure."""
    plan = plan_for(Route.SMARTHOST, cfg)
    contexts = ContextCache()
    session = SmtpSession(hop, cfg.host.name, cfg.timeouts)
    current = "connect"
    try:
        await session.open(contexts.get(plan) if plan.mode is TlsMode.IMPLICIT else None)
        steps.ok("connect", f"{hop.relay}: {_first_line(session.transcript[0][4:])}")
        if plan.mode is TlsMode.IMPLICIT:
            steps.ok("tls", _tls_detail(session, plan, hop.host))
        current = "ehlo"
        await session.hello()
        steps.ok("ehlo", " ".join(sorted(k.upper() for k in session.features)) or "(none)")
        current = "tls"
        if not await _starttls(session, plan, contexts, hop, steps):
            return False
        current = "auth"
        if creds is not None and not await _auth(session, cfg, creds, steps):
            return False
        current = "quit"
        await session.quit()
        steps.ok("quit", "session closed without sending mail")
        return True
    except SessionError as err:
        steps.fail(current, _failure_text(err.failure))
        session.abort()
        return False


async def _starttls(
    session: SmtpSession, plan: TlsPlan, contexts: ContextCache, hop: Hop, steps: _Steps
) -> bool:
    if plan.mode is TlsMode.IMPLICIT:
        return True
    offered = "starttls" in session.features
    decision = starttls_decision(plan, offered, session.tls_active)
    if decision is StartTls.FAIL:
        steps.fail("tls", f"TLS is required (tls: starttls), but {hop.relay} does not offer "
                          "STARTTLS")
        await session.quit()
        return False
    if decision is StartTls.SKIP:
        why = "tls: none" if plan.mode is TlsMode.NONE else "not offered (opportunistic)"
        steps.ok("tls", f"not used: {why}")
        return True
    reply = await session.starttls(contexts.get(plan))
    if reply.code != 220:
        if plan.mode is TlsMode.REQUIRED:
            steps.fail("tls", f"STARTTLS refused: {reply}")
            await session.quit()
            return False
        steps.ok("tls", f"STARTTLS refused ({reply}); continuing in clear (opportunistic)")
        return True
    steps.ok("tls", _tls_detail(session, plan, hop.host))
    await session.hello()  # RFC 3207: what the server offers after TLS is what counts
    return True


async def _auth(session: SmtpSession, cfg: Config, creds: Credentials, steps: _Steps) -> bool:
    smarthost = cfg.routing.smarthost
    plaintext_ok = smarthost is not None and smarthost.allow_plaintext_auth
    if not may_authenticate(session.tls_active, plaintext_ok):
        steps.fail("auth", "refusing to send credentials without TLS "
                           "(allow_plaintext_auth is false)")
        await session.quit()
        return False
    mechanism = choose_mechanism(session.auth_mechanisms)
    if mechanism is None:
        offered = " ".join(session.auth_mechanisms) or "none"
        steps.fail("auth", f"no usable AUTH mechanism offered (offered: {offered})")
        await session.quit()
        return False
    await session.authenticate(creds, mechanism)
    steps.ok("auth", f"AUTH {mechanism} accepted as {creds.username}")
    return True


def _failure_text(failure: SessionFailure) -> str:
    return f"{failure.error} [{failure.status}]"


# -- the probe ---------------------------------------------------------------------------


def _credentials(cfg: Config, account: str | None) -> tuple[Credentials | None, str]:
    """The login to test and a note on where it came from."""
    smarthost = cfg.routing.smarthost
    assert smarthost is not None
    if account is None:
        return smarthost.auth, "global credentials"
    if cfg.account_for(account) is None:
        raise ProbeConfigError(f"no account {account!r} in accounts[]")
    creds = credentials_for(account, cfg)
    if creds is not None and creds is not smarthost.auth:
        return creds, f"credentials of account {account}"
    why = "per_account_auth is off" if not smarthost.per_account_auth else "account has none"
    return creds, f"global credentials ({why})"


async def probe(
    cfg: Config,
    *,
    account: str | None = None,
    resolver_factory: Callable[[Config], Resolver] | None = None,
) -> ProbeReport:
    """Probe the smart host of ``cfg``; ``ProbeConfigError`` when there is none to probe."""
    smarthost = cfg.routing.smarthost
    if smarthost is None:
        raise ProbeConfigError("routing.smarthost is not configured: nothing to probe")
    creds, source = _credentials(cfg, account)
    steps = _Steps()
    report = ProbeReport(", ".join(f"{h.host}:{h.port}" for h in smarthost.targets), ())
    make = resolver_factory or _default_resolver
    targets = await _resolve(smarthost, make(cfg))
    if isinstance(targets, str):
        steps.fail("resolve", targets)
        return ProbeReport(report.smarthost, tuple(steps.steps))
    own = _own_addresses(cfg)
    looping = [h for h in targets.hops if h.address in own]
    if looping:
        steps.fail("resolve", f"{targets.detail}: {looping[0].address} is this host "
                              "(host.addresses): mail would loop")
        return ProbeReport(report.smarthost, tuple(steps.steps))
    steps.ok("resolve", targets.detail)
    if smarthost.pop_before_smtp is not None:
        pop = smarthost.pop_before_smtp
        failure = await PopBeforeSmtp(cfg).ensure()
        if failure is not None:
            steps.fail("pop", _failure_text(failure))
            return ProbeReport(report.smarthost, tuple(steps.steps))
        steps.ok("pop", f"POP3 login as {pop.username} at {pop.host}:{pop.port} "
                        f"({pop.tls.value}) accepted")
    if creds is None:
        steps.ok("credentials", "no credentials configured: AUTH not tried")
    else:
        steps.ok("credentials", f"testing {source} ({creds.username})")
    await _try_hops(targets.hops, cfg, creds, steps)
    return ProbeReport(report.smarthost, tuple(steps.steps))


async def _try_hops(
    hops: tuple[Hop, ...], cfg: Config, creds: Credentials | None, steps: _Steps
) -> None:
    """Like delivery: a host that cannot be reached or greets badly yields to the next one."""
    unreachable: list[str] = []
    for hop in hops:
        trial = _Steps()
        await _smtp_steps(hop, cfg, creds, trial)
        failed = next((s for s in trial.steps if not s.ok), None)
        if failed is not None and failed.name == "connect" and hop is not hops[-1]:
            unreachable.append(f"{hop.relay}: {failed.detail}")
            continue
        if unreachable:
            steps.ok("fallback", "unreachable first: " + "; ".join(unreachable))
        steps.steps += trial.steps
        return


def _default_resolver(cfg: Config) -> Resolver:
    return Resolver(cfg.dns.nameservers, timeout=float(cfg.timeouts.dns))
