"""The delivery-attempt planner: pure decisions for one message to one destination.

Modelled on dnspython's ``_Resolution``: an ``Attempt`` object decides, a short async loop
(the scheduler) performs what it is told and feeds the results back::

    attempt = Attempt(domain=d, recipients=rcpts, routing=cfg.routing, host=cfg.host)
    while not isinstance(action := attempt.next_action(), Finished):
        match action:
            case ResolveMx(name):
                attempt.on_mx(name, await resolver.mx(name))
            case ResolveAddresses(name):
                attempt.on_addresses(name, await resolver.addresses(name))
            case Transact(hop, rcpts):
                attempt.on_transaction(await transport.send(hop, rcpts))
    record(action.outcomes)            # exactly one Outcome per recipient

docs/delivery.md is the specification; each rule below is stated there and has a test row:

- **4xx at MAIL, RCPT or DATA** (direct): a temporary failure at that host; the recipients it
  concerns are tried at the remaining hosts, and deferred with the last temporary reply when
  none accepts. Unlike Postfix (which defers a RCPT 4xx without trying the next MX) this
  follows "every host tried, any temporary failure → defer" (docs/delivery.md, "Direct
  delivery"): a backup MX may well accept what a busy primary greylists.
- **5xx greeting / EHLO / STARTTLS** (direct): the host's failure, next host; if every host
  failed permanently and none temporarily, the recipients bounce with the last 5xx.
- **Loops, direct**: a hop whose address is one of ``host.addresses`` (or an MX host named
  ``host.name``) is skipped, and a session whose greeting names us is treated the same, like
  Postfix's "mail for X loops back to myself". Recipients for which *every* hop looped (no
  other host answered at all) are HELD (5.4.6), in ``direct_then_smarthost`` too: handing them
  to the smart host would send the mail back to us through it.
- **Loops, smart host**: the smart host is one destination; any loop there holds the
  recipients at once.
- **Smart host session failures** (connect, greeting, EHLO, TLS, POP, AUTH), even with a 5xx
  reply, always defer after the other smart host addresses were tried: a credential typo must
  never bounce a fleet's mail. ``bounce_on_5xx`` governs 5xx to MAIL, RCPT and DATA only, and
  such a 5xx is final at once (bounced, or deferred when ``bounce_on_5xx`` is off).
- **Smart host DNS trouble** (NXDOMAIN, no addresses, null MX with ``resolve_mx``) defers:
  it is a configuration problem, not the recipient's.
- **direct_then_smarthost**: the direct pass runs over every MX first (a backup MX is part of
  direct delivery); whatever it neither delivered, bounced, deferred-by-abort nor held goes to
  the smart host, whose result is final. Null MX and ``bounce_on_no_mx`` bounce (the domain's
  owner, or the spec, said so); a 5xx under ``bounce_on_mx_5xx`` bounces; NXDOMAIN, DNS
  trouble, missing addresses and every other failure hand over.
- **abort_on_rcpt_5xx**: the refused recipients follow their 5xx rule; all the others are
  DEFERRED at once (4.5.0) and not tried at another host in this attempt.

This module is long because docs/delivery.md is one set of rules: the MX ordering, the hop list
and the reply classification of all three routing modes are decided together here, and the
choices above are part of its contract.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from deliverd.config.model import HostConfig, RoutingConfig, RoutingMode, SmarthostConfig
from deliverd.core.outcomes import (
    Hop,
    Kind,
    Outcome,
    Reply,
    Route,
    SessionFailure,
    Stage,
    TransactionResult,
)
from deliverd.dns.resolver import (
    Addresses,
    AddressResult,
    DnsTempFailure,
    MxHosts,
    MxResult,
    NoMx,
    NullMx,
    NxDomain,
    ascii_domain,
    ip_literal,
)

# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolveMx:
    domain: str


@dataclass(frozen=True)
class ResolveAddresses:
    host: str


@dataclass(frozen=True)
class Transact:
    hop: Hop
    recipients: tuple[str, ...]
    ignore_failure_cache: bool = False


@dataclass(frozen=True)
class Finished:
    outcomes: tuple[Outcome, ...]


Action = ResolveMx | ResolveAddresses | Transact | Finished


# --- pure helpers -------------------------------------------------------------------------


def group_by_domain(recipients: Iterable[str]) -> dict[str, list[str]]:
    """Recipients by destination domain (lowercased A-label form), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for recipient in recipients:
        _, at, domain = recipient.rpartition("@")
        key = ascii_domain(domain) if at else ""
        groups.setdefault(key, []).append(recipient)
    return groups


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """RFC 5321 5.1: by preference, equal preferences in random order (load spreading)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record[0])  # sort is stable: keeps the shuffle


def status_for(reply: Reply) -> str:
    """The enhanced status of a reply, its class forced to agree with the reply code."""
    klass = str(reply.code // 100)
    if reply.enhanced and reply.enhanced.count(".") == 2:
        return klass + reply.enhanced[reply.enhanced.index(".") :]
    return f"{klass}.0.0"


def as_temporary(status: str) -> str:
    """The same detail as a 4.x.x status (a 5xx that policy turns into a deferral)."""
    return "4" + status[1:] if status[:1] in ("2", "5") else status


@dataclass(frozen=True)
class _Failure:
    """Why one recipient was not delivered at one point; becomes an Outcome's fields."""

    status: str
    diagnostic: str
    hop: Hop | None = None
    transcript: tuple[str, ...] = ()
    stage: Stage | None = None

    @property
    def temporary(self) -> bool:
        return self.status.startswith("4")


def _reply_failure(
    reply: Reply, result: TransactionResult, stage: Stage | None = None
) -> _Failure:
    return _Failure(status_for(reply), f"smtp; {reply}", result.hop, result.transcript, stage)


def _session_failure(failure: SessionFailure, result: TransactionResult) -> _Failure:
    if failure.reply is not None and not failure.reply.is_positive:
        return _reply_failure(failure.reply, result, failure.stage)
    status = failure.status
    if failure.temporary != status.startswith("4"):
        status = ("4" if failure.temporary else "5") + status[1:]
    relay = result.hop.relay
    if failure.stage is Stage.CONNECT:
        where = f"connect to {relay}"
    else:
        where = f"conversation with {relay} failed at {failure.stage.value}"
    return _Failure(status, f"x-deliverd; {where}: {failure.error}", result.hop, result.transcript,
                    failure.stage)


# --- per-route bookkeeping ----------------------------------------------------------------


@dataclass
class _Note:
    """What one recipient met on the current route (the last of each kind wins)."""

    temp: _Failure | None = None
    perm: _Failure | None = None
    loop: _Failure | None = None


@dataclass
class _Leg:
    """One pass over one route's hops: the MX hosts of the domain, or the smart host."""

    route: Route
    active: list[str]
    notes: dict[str, _Note]
    # MX lookups still to make, each with the port its hosts are reached on.
    mx_queries: deque[tuple[str, int]] = field(default_factory=deque)
    # Host names still to resolve: (name, MX preference or None, port).
    hosts: deque[tuple[str, int | None, int]] = field(default_factory=deque)
    hops: deque[Hop] = field(default_factory=deque)
    tried: set[tuple[str, int]] = field(default_factory=set)
    unresolved: list[str] = field(default_factory=list)
    # Hops skipped because the transport's connection failure cache had them (smart host list).
    cached: list[Hop] = field(default_factory=list)
    connected: bool = False  # some hop of this leg was really tried
    failover: bool = False  # a smart host list: when every host is cached, try them anyway
    ignore_failure_cache: bool = False

    def exhausted(self) -> bool:
        return not (self.mx_queries or self.hosts or self.hops)

    def note(self, recipient: str) -> _Note:
        return self.notes.setdefault(recipient, _Note())


class Attempt:
    """One delivery attempt: one message, one destination, a set of recipients."""

    def __init__(
        self,
        *,
        domain: str,
        recipients: Sequence[str],
        routing: RoutingConfig,
        host: HostConfig,
        rng: random.Random | None = None,
        route_name: str | None = None,
    ) -> None:
        if routing.mode is not RoutingMode.DIRECT and routing.smarthost is None:
            raise ValueError(f"routing mode {routing.mode.value} needs routing.smarthost")
        self.domain = ascii_domain(domain)
        self.recipients = tuple(dict.fromkeys(recipients))
        self._routing = routing
        self.route_name = route_name
        self._host = host
        self._own_addresses = frozenset(_canonical(a) for a in host.addresses)
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (not crypto)
        self._final: dict[str, Outcome] = {}
        self._pending: Action | None = None
        self._leg: _Leg | None = None
        if self.recipients:
            if routing.mode is RoutingMode.SMARTHOST:
                self._leg = self._smarthost_leg(list(self.recipients))
            else:
                self._leg = self._direct_leg()

    # --- the driver's interface --------------------------------------------------------

    def next_action(self) -> Action:
        """What to do next; the same action again until its result is fed back."""
        while self._pending is None:
            leg = self._leg
            if leg is not None:
                leg.active = [r for r in leg.active if r not in self._final]
            if leg is None:
                final = (self._final[r] for r in self.recipients)
                if self.route_name is not None:
                    final = (replace(o, route_name=self.route_name) for o in final)
                self._pending = Finished(tuple(final))
            elif leg.active and leg.exhausted() and self._retry_cached(leg):
                continue
            elif not leg.active or leg.exhausted():
                self._end_leg(leg)
            elif leg.mx_queries:
                self._pending = ResolveMx(leg.mx_queries[0][0])
            elif leg.hops:
                self._pending = Transact(
                    leg.hops.popleft(), tuple(leg.active), leg.ignore_failure_cache
                )
            else:
                self._pending = ResolveAddresses(leg.hosts[0][0])
        return self._pending

    def on_mx(self, domain: str, result: MxResult) -> None:
        leg = self._expect(ResolveMx(domain))
        name, port = leg.mx_queries.popleft()
        if leg.route is Route.DIRECT:
            self._direct_mx(leg, result, port)
        else:
            self._smarthost_mx(leg, name, port, result)

    def on_addresses(self, host: str, result: AddressResult) -> None:
        leg = self._expect(ResolveAddresses(host))
        name, preference, port = leg.hosts.popleft()
        if isinstance(result, Addresses):
            self._add_hops(leg, name, preference, port, result.addresses)
        elif isinstance(result, DnsTempFailure):
            failure = _Failure("4.4.3", f"dns; {result.reason}")
            for recipient in leg.active:
                leg.note(recipient).temp = failure
        else:
            leg.unresolved.append(name)

    def on_transaction(self, result: TransactionResult) -> None:
        pending = self._pending
        if not isinstance(pending, Transact) or pending.hop != result.hop:
            raise ValueError(f"unexpected transaction result for {result.hop.relay}")
        leg = self._leg
        assert leg is not None  # a Transact is only handed out while a leg runs
        self._pending = None
        if result.failure is not None and result.failure.cached:
            leg.cached.append(result.hop)
        else:
            leg.connected = True
        for recipient, verdict in _verdicts(pending.recipients, result).items():
            self._apply(leg, recipient, verdict, result)

    # --- DNS results ----------------------------------------------------------------------

    def _direct_mx(self, leg: _Leg, result: MxResult, port: int) -> None:
        domain = self.domain
        direct = self._routing.direct
        if isinstance(result, MxHosts):
            leg.hosts.extend(
                (host, pref, port) for pref, host in order_mx(result.records, self._rng)
            )
        elif isinstance(result, NullMx):
            self._settle_all(leg, Kind.BOUNCED, _Failure(
                "5.1.10", f"dns; {domain} accepts no mail (null MX, RFC 7505)"))
        elif isinstance(result, NoMx) and direct.bounce_on_no_mx:
            self._settle_all(leg, Kind.BOUNCED, _Failure(
                "5.4.4", f"dns; {domain} has no MX record (bounce_on_no_mx)"))
        elif isinstance(result, NoMx):
            leg.hosts.append((domain, None, port))  # RFC 5321 5.1 implicit MX
        elif isinstance(result, NxDomain):
            self._fail_leg(leg, _Failure("5.1.2", f"dns; {domain}: no such domain (NXDOMAIN)"))
        else:
            self._fail_leg(leg, _Failure("4.4.3", f"dns; {result.reason}"))

    def _smarthost_mx(self, leg: _Leg, name: str, port: int, result: MxResult) -> None:
        """One smart host's MX lookup; a failure is noted and the next host of a list tried."""
        if isinstance(result, MxHosts):
            leg.hosts.extend(
                (host, pref, port) for pref, host in order_mx(result.records, self._rng)
            )
        elif isinstance(result, NoMx):
            leg.hosts.append((name, None, port))
        elif isinstance(result, DnsTempFailure):
            self._note_all(leg, _Failure("4.4.3", f"dns; {result.reason}"))
        else:
            what = "no such domain" if isinstance(result, NxDomain) else "null MX"
            self._note_all(leg, _Failure("4.4.4", f"dns; smart host {name}: {what}"))

    def _add_hops(self, leg: _Leg, name: str, pref: int | None, port: int,
                  found: Sequence[str]) -> None:
        ours = ascii_domain(name) == ascii_domain(self._host.name)
        for address in found:
            hop = Hop(name, address, port, leg.route, pref, self.route_name)
            if ours or _canonical(address) in self._own_addresses:
                self._loop(leg, _Failure("5.4.6", f"mail loop: {hop.relay} is this host", hop))
            elif (address, port) not in leg.tried:
                leg.tried.add((address, port))
                leg.hops.append(hop)

    # --- transaction results --------------------------------------------------------------

    def _apply(self, leg: _Leg, recipient: str, verdict: _Verdict, result: TransactionResult
               ) -> None:
        if verdict.delivered is not None:
            self._settle(recipient, Outcome(
                recipient, Kind.DELIVERED, "2.0.0", f"smtp; {verdict.delivered}", result.hop,
                result.transcript, tls=result.tls, hop_dsn=result.dsn))
            return
        failure = verdict.failure
        assert failure is not None  # a verdict is either delivered or failed
        if verdict.loop:
            self._loop(leg, failure, (recipient,))
        elif verdict.aborted_bystander:
            self._settle(recipient, _outcome(recipient, Kind.DEFERRED, failure))
        elif leg.route is Route.SMARTHOST:
            self._apply_smarthost(leg, recipient, failure, verdict.message_stage)
        else:
            self._apply_direct(leg, recipient, failure, verdict.message_stage)

    def _apply_direct(self, leg: _Leg, recipient: str, failure: _Failure, message: bool
                      ) -> None:
        if failure.temporary:
            leg.note(recipient).temp = failure
        elif message and self._routing.direct.bounce_on_mx_5xx:
            self._settle(recipient, _outcome(recipient, Kind.BOUNCED, failure))
        else:
            leg.note(recipient).perm = failure

    def _apply_smarthost(self, leg: _Leg, recipient: str, failure: _Failure, message: bool
                         ) -> None:
        if failure.temporary or not message:
            leg.note(recipient).temp = _deferral(failure)
        elif self._smarthost.bounce_on_5xx:
            self._settle(recipient, _outcome(recipient, Kind.BOUNCED, failure))
        else:
            self._settle(recipient, _outcome(recipient, Kind.DEFERRED, _deferral(failure)))

    def _loop(self, leg: _Leg, failure: _Failure, recipients: Sequence[str] | None = None
              ) -> None:
        """Direct: skip the hop, remember why; smart host: hold at once."""
        targets = tuple(leg.active if recipients is None else recipients)
        if leg.route is Route.SMARTHOST:
            for recipient in targets:
                self._settle(recipient, _outcome(recipient, Kind.HELD, failure))
            return
        for recipient in targets:
            leg.note(recipient).loop = failure

    # --- legs ----------------------------------------------------------------------------

    @property
    def routing(self) -> RoutingConfig:
        """The routing this attempt follows: ``routing``, or its route's mode and smart host."""
        return self._routing

    @property
    def _smarthost(self) -> SmarthostConfig:
        smarthost = self._routing.smarthost
        assert smarthost is not None  # checked in __init__ for the modes that use it
        return smarthost

    def _direct_leg(self) -> _Leg:
        leg = _Leg(Route.DIRECT, list(self.recipients), {})
        port = self._routing.direct.port
        literal = ip_literal(self.domain) if self.domain.startswith("[") else None
        if literal is not None:
            self._add_hops(leg, literal, None, port, (literal,))  # user@[192.0.2.1]: no DNS
        else:
            leg.mx_queries.append((self.domain, port))
        return leg

    def _smarthost_leg(self, recipients: list[str]) -> _Leg:
        """The smart host, or each host of its failover list in order, as one leg."""
        smarthost = self._smarthost
        leg = _Leg(Route.SMARTHOST, recipients, {}, failover=len(smarthost.targets) > 1)
        for target in smarthost.targets:
            literal = ip_literal(target.host)
            if literal is not None and not leg.failover:
                self._add_hops(leg, target.host, None, target.port, (literal,))
            elif smarthost.resolve_mx:
                leg.mx_queries.append((target.host, target.port))
            else:
                leg.hosts.append((target.host, None, target.port))
        return leg

    def _retry_cached(self, leg: _Leg) -> bool:
        """Every host of a failover list was skipped as recently failed: try them all anyway
        (as Haraka's host pool does), once, rather than defer without a single connection."""
        if not leg.failover or leg.connected or not leg.cached or leg.ignore_failure_cache:
            return False
        leg.ignore_failure_cache = True
        leg.hops.extend(leg.cached)
        leg.cached.clear()
        return True

    def _end_leg(self, leg: _Leg) -> None:
        """Every recipient still active gets its route's verdict (or moves to the next)."""
        self._leg = None
        handover: list[str] = []
        for recipient in leg.active:
            note = leg.note(recipient)
            if note.temp is None and note.perm is None and note.loop is not None:
                self._settle(recipient, _outcome(recipient, Kind.HELD, note.loop))
            elif leg.route is Route.DIRECT and self._falls_back:
                handover.append(recipient)
            elif note.temp is not None:
                self._settle(recipient, _outcome(recipient, Kind.DEFERRED, note.temp))
            elif note.perm is not None and leg.route is Route.DIRECT:
                self._settle(recipient, _outcome(recipient, Kind.BOUNCED, note.perm))
            elif note.perm is not None:  # the smart host never bounces by exhaustion
                self._settle(recipient, _outcome(recipient, Kind.DEFERRED, _deferral(note.perm)))
            else:
                self._settle(recipient, self._no_route(leg, recipient))
        if handover:
            self._leg = self._smarthost_leg(handover)

    @property
    def _falls_back(self) -> bool:
        return self._routing.mode is RoutingMode.DIRECT_THEN_SMARTHOST

    def _no_route(self, leg: _Leg, recipient: str) -> Outcome:
        """No hop was ever tried: every host lacked addresses (or there was no host)."""
        names = ", ".join(leg.unresolved) or "none"
        if leg.route is Route.DIRECT:
            return _outcome(recipient, Kind.BOUNCED, _Failure(
                "5.4.4", f"dns; no address for any MX host of {self.domain} ({names})"))
        names = ", ".join(leg.unresolved) or self._smarthost.name
        return _outcome(recipient, Kind.DEFERRED, _Failure(
            "4.4.4", f"dns; no address for smart host {names}"))

    def _fail_leg(self, leg: _Leg, failure: _Failure) -> None:
        """A route-wide failure (its DNS): noted for every active recipient, route over."""
        self._note_all(leg, failure)
        leg.mx_queries.clear()
        leg.hosts.clear()
        leg.hops.clear()

    def _note_all(self, leg: _Leg, failure: _Failure) -> None:
        """A failure of one host of a route: noted for every active recipient, route goes on."""
        for recipient in leg.active:
            note = leg.note(recipient)
            if failure.temporary:
                note.temp = failure
            else:
                note.perm = failure

    def _settle_all(self, leg: _Leg, kind: Kind, failure: _Failure) -> None:
        for recipient in leg.active:
            self._settle(recipient, _outcome(recipient, kind, failure))

    def _settle(self, recipient: str, outcome: Outcome) -> None:
        self._final.setdefault(recipient, outcome)

    def _expect(self, action: ResolveMx | ResolveAddresses) -> _Leg:
        if self._pending != action or self._leg is None:
            raise ValueError(f"unexpected result for {action}; waiting for {self._pending}")
        self._pending = None
        return self._leg


# --- classifying one transaction's result per recipient ------------------------------------


@dataclass(frozen=True)
class _Verdict:
    delivered: Reply | None = None
    failure: _Failure | None = None
    message_stage: bool = False  # MAIL/RCPT/DATA: what the 5xx rules govern
    loop: bool = False
    aborted_bystander: bool = False  # abort_on_rcpt_5xx: deferred, not retried elsewhere


def _verdicts(recipients: Sequence[str], result: TransactionResult) -> dict[str, _Verdict]:
    failure = result.failure
    if failure is not None and failure.loop:
        loop = _Failure("5.4.6", f"mail loop: greeting of {result.hop.relay} names this host",
                        result.hop, result.transcript)
        return {r: _Verdict(failure=loop, loop=True) for r in recipients}
    if failure is not None and failure.stage.is_host_failure():
        host = _session_failure(failure, result)
        return {r: _Verdict(failure=host) for r in recipients}
    return {r: _recipient_verdict(r, result) for r in recipients}


def _recipient_verdict(recipient: str, result: TransactionResult) -> _Verdict:
    rcpt = result.rcpt_replies.get(recipient)
    if rcpt is not None and not rcpt.is_positive:
        refused = _reply_failure(rcpt, result)
        if result.aborted and not rcpt.is_permanent:
            return _Verdict(failure=refused, aborted_bystander=True)
        return _Verdict(failure=refused, message_stage=True)
    if result.aborted:
        return _Verdict(failure=_Failure(
            "4.5.0",
            f"x-deliverd; transaction at {result.hop.relay} abandoned after a refused "
            "recipient (abort_on_rcpt_5xx); retried without it",
            result.hop, result.transcript), aborted_bystander=True)
    if result.failure is not None:
        return _Verdict(failure=_session_failure(result.failure, result), message_stage=True)
    if rcpt is None:
        return _Verdict(failure=_Failure(
            "4.5.0", f"x-deliverd; no RCPT reply from {result.hop.relay}", result.hop,
            result.transcript), message_stage=True)
    data = result.data_reply
    if data is None:
        return _Verdict(failure=_Failure(
            "4.5.0", f"x-deliverd; no reply to DATA from {result.hop.relay}", result.hop,
            result.transcript), message_stage=True)
    if data.is_positive:
        return _Verdict(delivered=data)
    return _Verdict(failure=_reply_failure(data, result), message_stage=True)


def _outcome(recipient: str, kind: Kind, failure: _Failure) -> Outcome:
    return Outcome(recipient, kind, failure.status, failure.diagnostic, failure.hop,
                   failure.transcript, failure.stage)


def _deferral(failure: _Failure) -> _Failure:
    return _Failure(as_temporary(failure.status), failure.diagnostic, failure.hop,
                    failure.transcript, failure.stage)


def _canonical(address: str) -> str:
    return ip_literal(address) or address.lower()
