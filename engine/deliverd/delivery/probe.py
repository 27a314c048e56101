"""``deliverd probe``: check from this host that the smart host would take our mail.

The probe walks the same path a smart host delivery takes (docs/delivery.md): resolve the
smart host (address lookup, or MX with ``resolve_mx``), POP-before-SMTP when configured
(before the SMTP session, as the engine does), then delivery's own handshake
(``smtp.handshake.establish``: connect and greeting, refusing a loop to ourselves, EHLO, TLS
by the route's plan, AUTH with the global credentials or those a given account would use),
then QUIT. It never sends MAIL. The handshake reports each step to the probe as it passes or
fails, and no STARTTLS or AUTH decision is made anywhere else, so a passing probe means
delivery's code got through, not a look-alike.

The result is a list of steps, each ``ok`` with a one-line detail; no detail ever carries a
password (AUTH is exchanged by ``SmtpSession``, which redacts it, and errors are built from
server replies and local conditions only).
"""

from __future__ import annotations

import ipaddress
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
from deliverd.smtp.handshake import (
    Handshake,
    close_after_failure,
    establish,
    failure_text,
    retries_in_clear,
)
from deliverd.smtp.pop3 import PopBeforeSmtp
from deliverd.smtp.session import SmtpSession
from deliverd.smtp.tls import ContextCache, plan_for


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
    """The probe's report; also the handshake's ``StepReport``."""

    steps: list[ProbeStep] = field(default_factory=list)
    failure: SessionFailure | None = None  # the session failure behind the last failed step

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


# -- the SMTP part: delivery's own handshake, watched step by step ------------------------


async def _smtp_steps(
    hop: Hop, cfg: Config, creds: Credentials | None, steps: _Steps
) -> bool:
    """Connect, EHLO, TLS and AUTH as delivery does them, then QUIT; False at the first
    failure. A broken handshake under opportunistic TLS is tried again in clear text, as
    delivery tries it, so what passes here passes there."""
    plan = plan_for(Route.SMARTHOST, cfg)
    handshake = Handshake.for_config(plan, creds, cfg)
    contexts = ContextCache()
    trial = _Steps()
    session = await _handshake(hop, cfg, handshake, contexts, trial)
    if session is None:
        failed = trial.steps[-1]
        failure = trial.failure
        if failure is None or not retries_in_clear(failure, plan):
            steps.steps += trial.steps
            return False
        clear = _Steps()
        session = await _handshake(hop, cfg, handshake.in_clear(), contexts, clear)
        steps.steps += [s for s in trial.steps if s is not failed]
        steps.ok("tls", f"handshake failed ({failed.detail}); retried in clear text, as "
                        "delivery does (opportunistic)")
        steps.steps += [s for s in clear.steps if s.name not in ("connect", "ehlo", "tls")]
        if session is None:
            return False
    else:
        steps.steps += trial.steps
    await session.quit()
    steps.ok("quit", "session closed without sending mail")
    return True


async def _handshake(
    hop: Hop, cfg: Config, handshake: Handshake, contexts: ContextCache, steps: _Steps
) -> SmtpSession | None:
    """An established session, or None after ``steps`` recorded the failure."""
    session = SmtpSession(hop, cfg.host.name, cfg.timeouts)
    try:
        await establish(session, handshake, contexts, steps)
    except SessionError as err:
        steps.failure = err.failure
        await close_after_failure(session, err.failure)
        return None
    except BaseException:
        session.abort()
        raise
    return session


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
            steps.fail("pop", failure_text(failure))
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
