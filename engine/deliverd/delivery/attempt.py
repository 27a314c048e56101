"""Drive one planner ``Attempt`` with real I/O: the short await loop around the pure router.

The planner decides (which lookup, which hop, what each reply means); this module only performs
what it is told: DNS through the resolver, SMTP through the transport. For a direct hop it also
asks DNS for the transport security the receiver publishes (``deliverd.delivery.security``).
"""

from __future__ import annotations

from deliverd.config.model import Config
from deliverd.core.outcomes import (
    Envelope,
    Outcome,
    Route,
    Stage,
    StreamedBody,
    TransactionResult,
)
from deliverd.delivery.credentials import credentials_for
from deliverd.delivery.router import Attempt, Finished, ResolveAddresses, ResolveMx, Transact
from deliverd.delivery.security import HopSecurity
from deliverd.delivery.sts_policies import StsPolicies
from deliverd.dns.resolver import (
    AddressResult,
    DnsTempFailure,
    MxResult,
    NoAddresses,
    NullMx,
    NxDomain,
    Resolver,
)
from deliverd.ops.metrics import Metrics, connection_failure_kind
from deliverd.reports.tlsrpt import is_tls_required_no
from deliverd.smtp.transport import CACHED_CONNECT_ERROR, Transport


async def run_attempt(
    attempt: Attempt,
    *,
    cfg: Config,
    envelope: Envelope,
    resolver: Resolver,
    transport: Transport,
    metrics: Metrics,
    sts: StsPolicies | None = None,
) -> tuple[Outcome, ...]:
    """Run ``attempt`` to its end; returns exactly one outcome per recipient.

    ``metrics`` counts what only this loop sees: DNS failures and failed connections.
    """
    security = HopSecurity(cfg, resolver, sts, enabled=not is_tls_required_no(_head(envelope)))
    while True:
        action = attempt.next_action()
        if isinstance(action, Finished):
            return action.outcomes
        if isinstance(action, ResolveMx):
            mx = await resolver.mx(action.domain)
            _count_dns(metrics, mx)
            security.on_mx(action.domain, mx)
            attempt.on_mx(action.domain, mx)
        elif isinstance(action, ResolveAddresses):
            addresses = await resolver.addresses(action.host)
            _count_dns(metrics, addresses)
            security.on_addresses(action.host, addresses)
            attempt.on_addresses(action.host, addresses)
        elif isinstance(action, Transact):
            subset = Envelope(
                sender=envelope.sender,
                recipients=tuple(action.recipients),
                data=envelope.data,
                smtputf8=envelope.smtputf8,
                eightbit=envelope.eightbit,
                dsn=envelope.dsn,
            )
            creds = (
                credentials_for(envelope.sender, cfg)
                if action.hop.route is Route.SMARTHOST
                else None
            )
            domain = action.recipients[0].rpartition("@")[2]
            plan = await security.plan(action.hop, domain)
            if isinstance(plan, TransactionResult):  # no secure way to this hop right now
                result = plan
            else:
                result = await transport.transact(
                    action.hop, subset, credentials=creds,
                    ignore_failure_cache=action.ignore_failure_cache, plan=plan,
                )
            _count_connection(metrics, result)
            await security.count(action.hop, domain, result)
            attempt.on_transaction(result)
        else:  # pragma: no cover - the planner only emits the four actions above
            raise TypeError(f"unknown planner action {action!r}")


_DNS_FAILURE_KINDS: tuple[tuple[type, str], ...] = (
    (NxDomain, "nxdomain"), (NullMx, "null_mx"), (NoAddresses, "no_address"),
    (DnsTempFailure, "temporary"),
)


def _count_dns(metrics: Metrics, result: MxResult | AddressResult) -> None:
    for kind, label in _DNS_FAILURE_KINDS:
        if isinstance(result, kind):
            metrics.dns_failure(label)
            return


def _count_connection(metrics: Metrics, result: TransactionResult) -> None:
    failure = result.failure
    if failure is None or failure.error == CACHED_CONNECT_ERROR:
        return
    if failure.stage is Stage.CONNECT:
        metrics.connection_failure(connection_failure_kind(failure.error))
    elif failure.stage is Stage.GREETING:
        rejected = failure.reply is not None
        metrics.connection_failure(
            "greeting" if rejected else connection_failure_kind(failure.error)
        )


def _head(envelope: Envelope) -> bytes:
    """The start of the message, where its header section is (all of it for a small body)."""
    data = envelope.data
    return data.head if isinstance(data, StreamedBody) else data
