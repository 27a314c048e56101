"""The transport security a direct hop must get: DANE (RFC 7672) from DNSSEC-validated DNS,
else MTA-STS (RFC 8461) from the recipient domain's published policy.

One ``HopSecurity`` lives for one delivery attempt. It learns from the MX and address answers
the attempt already asked for which MX hosts DNSSEC vouches for, and before each direct
transaction it asks for the host's TLSA records (only then: RFC 7672 §2.2.2 wants the MX
RRset and the host's address records validated first, otherwise the host name itself could be
forged and its TLSA would prove nothing).

- validated, usable TLSA → TLS required and verified by the records (``smtp.tls.dane_plan``);
- validated TLSA, all unusable → TLS required, without verification (RFC 7672 §2.2);
- no TLSA, or not validated → the route's own plan;
- the TLSA lookup failed (SERVFAIL, a bogus signature, a timeout) → this hop is not used now: a
  ``TransactionResult`` with a temporary STARTTLS failure (4.7.5) goes to the planner, which
  tries the next MX or defers, never delivers in clear text.

With no TLSA records for the hop, the recipient domain's MTA-STS policy (``StsPolicies``) is
asked: under ``enforce`` an MX host the policy does not list is skipped (4.7.5, the planner
goes on to the next MX or defers), and a listed one gets STARTTLS with a certificate verified
against the trust store and the MX name (``MTA_STS_PLAN``); ``testing`` and ``none`` change
nothing about delivery.

Every transaction under a policy (TLSA records or an ``enforce``/``testing`` MTA-STS policy) is
counted for TLS-RPT (RFC 8460) per recipient domain and UTC day in the queue database
(``count``): a success, or the failure's result type. Under ``enforce`` an MX the policy does
not list is never tried, so not counted; under ``testing`` it counts as a
``validation-failure`` and is used anyway; whether its certificate would
have verified is not checked (the session is counted by whether TLS was used).
"""

from __future__ import annotations

from datetime import UTC, datetime

from deliverd.config.model import Config
from deliverd.core.outcomes import Hop, Route, SessionFailure, Stage, TransactionResult
from deliverd.delivery.sts_policies import StsPolicies
from deliverd.dns.resolver import (
    Addresses,
    AddressResult,
    DnsTempFailure,
    MxHosts,
    MxResult,
    NoMx,
    Resolver,
    TlsaRecords,
)
from deliverd.reports.tlsrpt import session_result
from deliverd.smtp.dane import Tlsa
from deliverd.smtp.mta_sts import Policy, StsMode
from deliverd.smtp.tls import MTA_STS_PLAN, TlsPlan, dane_plan

STATUS_NO_SECURE_PATH = "4.7.5"


class HopSecurity:
    """What DNSSEC says about the hops of one attempt; see the module docstring."""

    def __init__(self, cfg: Config, resolver: Resolver, sts: StsPolicies | None = None,
                 *, enabled: bool = True) -> None:
        self._enabled = enabled  # False: TLS-Required: No (RFC 8689), the route's plan only
        self._dane = cfg.routing.direct.dane
        self._resolver = resolver
        self._sts = sts
        self._sts_on = cfg.routing.direct.mta_sts and sts is not None
        self._policies: dict[str, Policy | None] = {}
        # hop -> (policy type, policy text, result forced on the session or None)
        self._applied: dict[Hop, tuple[str, str, str | None]] = {}
        self._secure_mx_hosts: set[str] = set()
        self._secure_addresses: set[str] = set()

    def on_mx(self, domain: str, result: MxResult) -> None:
        if isinstance(result, MxHosts) and result.secure:
            self._secure_mx_hosts.update(host.lower() for _, host in result.records)
        elif isinstance(result, NoMx) and result.secure:
            # RFC 7672 §2.2.1: no MX, securely; the domain itself is the host, and its TLSA
            # (at _25._tcp.<domain>) counts once its address records validate too.
            self._secure_mx_hosts.add(domain.lower())

    def on_addresses(self, host: str, result: AddressResult) -> None:
        if isinstance(result, Addresses) and result.secure:
            self._secure_addresses.add(host.lower())

    def dane_applies(self, hop: Hop) -> bool:
        host = hop.host.lower()
        return (
            self._dane
            and hop.route is Route.DIRECT
            and host in self._secure_mx_hosts
            and host in self._secure_addresses
        )

    async def plan(self, hop: Hop, domain: str) -> TlsPlan | TransactionResult | None:
        """The plan for ``hop`` serving ``domain`` (None: the route's own), or the failure
        that skips it."""
        if hop.route is not Route.DIRECT or not self._enabled:
            return None
        if self.dane_applies(hop):
            dane = await self._dane_plan(hop)
            if dane is not None:
                return dane
        return await self._sts_plan(hop, domain)

    async def count(self, hop: Hop, domain: str, result: TransactionResult) -> None:
        """TLS-RPT: one session under a policy, succeeded or failed with a result type."""
        applied = self._applied.pop(hop, None)
        if applied is None or self._sts is None:
            return
        policy_type, text, forced = applied
        outcome = forced if forced is not None else session_result(result)
        if outcome is None:
            return
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        mx = hop.host.lower() if outcome else ""
        await self._sts.count_result((domain.lower(), day, policy_type, mx, outcome), text)

    async def policy(self, domain: str) -> Policy | None:
        """The MTA-STS policy of ``domain``, asked once per attempt."""
        if self._sts is None or not self._sts_on:
            return None
        key = domain.lower()
        if key not in self._policies:
            self._policies[key] = await self._sts.policy(key)
        return self._policies[key]

    async def _sts_plan(self, hop: Hop, domain: str) -> TlsPlan | TransactionResult | None:
        policy = await self.policy(domain)
        if policy is None or policy.mode is StsMode.NONE:
            return None
        allowed = policy.allows(hop.host)
        if policy.mode is StsMode.TESTING:
            self._applied[hop] = ("sts", policy.text, None if allowed else "validation-failure")
            return None
        if allowed:
            self._applied[hop] = ("sts", policy.text, None)
        else:  # no session is tried, so none is counted
            return TransactionResult(hop, failure=SessionFailure(
                Stage.STARTTLS,
                f"MTA-STS: {hop.host} is not an MX host the policy of {domain} allows",
                status=STATUS_NO_SECURE_PATH,
            ))
        return MTA_STS_PLAN

    async def _dane_plan(self, hop: Hop) -> TlsPlan | TransactionResult | None:
        found = await self._resolver.tlsa(hop.host)
        if isinstance(found, DnsTempFailure):
            return TransactionResult(hop, failure=SessionFailure(
                Stage.STARTTLS,
                f"DANE: TLSA lookup for {hop.host} failed, not delivering without it "
                f"({found.reason})",
                status=STATUS_NO_SECURE_PATH,
            ))
        if isinstance(found, TlsaRecords):
            records = tuple(Tlsa(*record) for record in found.records)
            text = "\n".join(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)
            self._applied[hop] = ("tlsa", text, None)
            return dane_plan(records)
        return None
