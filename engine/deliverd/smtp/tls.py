"""Which TLS a hop gets, decided from the route and the smart host policy; ssl contexts.

Direct (MX) delivery follows ``routing.direct.tls``: opportunistic and unverified by default,
like Postfix ``smtp_tls_security_level = may`` (MX host names are not authenticated by DNS, so
verifying them would only turn mail away), or ``required`` (Postfix ``encrypt``). DANE raises a
hop above that when its MX and TLSA answers are DNSSEC-validated (``dane_plan``): usable TLSA
records mean TLS verified by them (Postfix ``dane``), TLSA records that are all unusable mean
TLS without verification. The smart host follows ``routing.smarthost.tls`` and ``verify_tls``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import Enum, StrEnum

from deliverd.config.model import Config, DirectTls, TlsPolicy
from deliverd.core.outcomes import Route
from deliverd.smtp.dane import Tlsa, usable


class TlsMode(Enum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered; clear text otherwise
    REQUIRED = "required"  # STARTTLS or no delivery
    IMPLICIT = "implicit"  # TLS from the first byte (port 465 style)


class StartTls(Enum):
    SKIP = "skip"
    START = "start"
    FAIL = "fail"  # required but not offered


class TlsOutcome(StrEnum):
    """How a delivery was protected, as logs name it."""

    DANE = "dane"  # certificate matched a DNSSEC-validated TLSA record
    MTA_STS = "mta-sts"  # certificate verified under an enforced MTA-STS policy
    VERIFIED = "verified"  # certificate and host name verified against the trust store
    ENCRYPTED = "encrypted"  # TLS without authentication
    NONE = "none"  # clear text


@dataclass(frozen=True)
class TlsPlan:
    mode: TlsMode
    verify: bool = False
    ca_file: str | None = None
    dane: tuple[Tlsa, ...] = ()  # usable TLSA records the peer chain must match
    mta_sts: bool = False  # verification asked for by an enforced MTA-STS policy

    def outcome(self, tls_active: bool) -> TlsOutcome:
        if not tls_active:
            return TlsOutcome.NONE
        if self.dane:
            return TlsOutcome.DANE
        if self.mta_sts and self.verify:
            return TlsOutcome.MTA_STS
        return TlsOutcome.VERIFIED if self.verify else TlsOutcome.ENCRYPTED

    @property
    def authenticated(self) -> bool:
        return self.verify or bool(self.dane)

    @property
    def may_fall_back_to_clear(self) -> bool:
        """A failed handshake may be retried in clear text (opportunistic only, as Postfix)."""
        return self.mode is TlsMode.OPPORTUNISTIC


_MODE_BY_POLICY = {
    TlsPolicy.STARTTLS: TlsMode.REQUIRED,
    TlsPolicy.TLS: TlsMode.IMPLICIT,
    TlsPolicy.OPPORTUNISTIC: TlsMode.OPPORTUNISTIC,
    TlsPolicy.NONE: TlsMode.NONE,
}

DIRECT_PLAN = TlsPlan(TlsMode.OPPORTUNISTIC, verify=False)
REQUIRED_PLAN = TlsPlan(TlsMode.REQUIRED, verify=False)


def plan_for(route: Route, cfg: Config) -> TlsPlan:
    """The TLS plan for a hop on ``route`` under ``cfg`` before DANE or MTA-STS are asked."""
    smarthost = cfg.routing.smarthost
    if route is Route.DIRECT or smarthost is None:
        return REQUIRED_PLAN if cfg.routing.direct.tls is DirectTls.REQUIRED else DIRECT_PLAN
    return TlsPlan(_MODE_BY_POLICY[smarthost.tls], smarthost.verify_tls, smarthost.ca_file)


# RFC 8461 §4.2: an MX under an enforced policy needs STARTTLS and a certificate that the trust
# store vouches for and that names the MX host.
MTA_STS_PLAN = TlsPlan(TlsMode.REQUIRED, verify=True, mta_sts=True)


def dane_plan(records: tuple[Tlsa, ...]) -> TlsPlan:
    """RFC 7672 §2.2: validated TLSA records make TLS mandatory; only usable ones verify."""
    return TlsPlan(TlsMode.REQUIRED, verify=False, dane=usable(records))


def starttls_decision(plan: TlsPlan, offered: bool, active: bool) -> StartTls:
    """What to do after EHLO, given whether STARTTLS is offered and TLS already runs."""
    if active or plan.mode in (TlsMode.NONE, TlsMode.IMPLICIT):
        return StartTls.SKIP
    if offered:
        return StartTls.START
    return StartTls.FAIL if plan.mode is TlsMode.REQUIRED else StartTls.SKIP


def client_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client context: full chain and host name check, or encryption without verification."""
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ContextCache:
    """One context per (verify, ca_file): building one reads the CA store, so do it once."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}

    def get(self, plan: TlsPlan) -> ssl.SSLContext:
        key = (plan.verify, plan.ca_file if plan.verify else None)
        context = self._contexts.get(key)
        if context is None:
            context = client_context(*key)
            self._contexts[key] = context
        return context
