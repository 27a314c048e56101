"""The attempt planner, docs/delivery.md one rule a row, driven by scripted DNS and SMTP results.

No sockets: a scripted driver plays resolver and transport. Peers are keyed by address and
turn (hop, recipients) into a TransactionResult the way the transport would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deliverd.config.model import (
    DirectConfig,
    HostConfig,
    RoutingConfig,
    RoutingMode,
    SmarthostConfig,
    SmarthostHost,
)
from deliverd.core.outcomes import Hop, Kind, Outcome, Reply, Route, SessionFailure, Stage
from deliverd.core.outcomes import TransactionResult as Result
from deliverd.delivery.router import (
    Attempt,
    Finished,
    ResolveAddresses,
    ResolveMx,
    Transact,
    as_temporary,
    group_by_domain,
    order_mx,
    status_for,
)
from deliverd.dns.resolver import (
    Addresses,
    AddressResult,
    DnsTempFailure,
    MxHosts,
    MxResult,
    NoAddresses,
    NoMx,
    NullMx,
    NxDomain,
)

# Named replies (aiosmtpd testing/statuscodes.py style).
OK = Reply(250, "Ok", "2.1.0")
QUEUED = Reply(250, "Ok: queued as 4711", "2.0.0")
GREYLISTED = Reply(451, "Greylisted, try again later", "4.7.1")
BUSY = Reply(421, "Too busy", "4.3.2")
NO_USER = Reply(550, "No such user", "5.1.1")
POLICY = Reply(554, "Rejected by policy", "5.7.1")
NO_SERVICE = Reply(554, "No SMTP service here", "5.3.2")
BAD_CREDENTIALS = Reply(535, "Authentication credentials invalid", "5.7.8")
DATA_REJECTED = Reply(554, "Message content rejected", "5.6.0")

ME = HostConfig("mta.deliverd.test", ("127.0.0.99", "::1"))
A, B, C = "alice@dest.test", "bob@dest.test", "carol@dest.test"

Peer = Callable[[Hop, tuple[str, ...]], Result]


# --- peers ---------------------------------------------------------------------------------


def accept(hop: Hop, rcpts: tuple[str, ...]) -> Result:
    return Result(hop, {r: OK for r in rcpts}, QUEUED, transcript=("S: 250 queued",))


def fail_at(stage: Stage, error: str, reply: Reply | None = None, status: str = "4.4.1",
            loop: bool = False) -> Peer:
    temporary = reply.is_temporary if reply else status.startswith("4")
    failure = SessionFailure(stage, error, reply, temporary, status, loop)
    return lambda hop, rcpts: Result(hop, failure=failure)


REFUSED = fail_at(Stage.CONNECT, "Connection refused")
TIMEOUT = fail_at(Stage.GREETING, "timed out waiting for the greeting", status="4.4.2")
LOOP = fail_at(Stage.GREETING, "greeting names mta.deliverd.test", loop=True)
NO_BANNER = fail_at(Stage.GREETING, "refused to talk", NO_SERVICE)


def rcpt(replies: Mapping[str, Reply], data: Reply = QUEUED, aborted: bool = False) -> Peer:
    def peer(hop: Hop, rcpts: tuple[str, ...]) -> Result:
        got = {r: replies.get(r, OK) for r in rcpts}
        accepted = any(reply.is_positive for reply in got.values())
        final = None if aborted or not accepted else data
        return Result(hop, got, final, aborted=aborted)

    return peer


def data(reply: Reply) -> Peer:
    return rcpt({}, data=reply)


# --- the scripted driver --------------------------------------------------------------------


@dataclass
class Script:
    mx: dict[str, MxResult] = field(default_factory=dict)
    addresses: dict[str, AddressResult] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    strict: bool = True  # unscripted lookups or connections fail the test


@dataclass
class Run:
    outcomes: dict[str, Outcome]
    actions: list[object]

    @property
    def contacted(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(a.hop.relay, a.recipients) for a in self.actions if isinstance(a, Transact)]


def drive(attempt: Attempt, script: Script, max_steps: int = 500) -> Run:
    actions: list[object] = []
    for _ in range(max_steps):
        action = attempt.next_action()
        actions.append(action)
        match action:
            case Finished(outcomes):
                by_recipient = {o.recipient: o for o in outcomes}
                assert len(by_recipient) == len(outcomes), "two outcomes for one recipient"
                return Run(by_recipient, actions)
            case ResolveMx(domain):
                assert domain in script.mx or not script.strict, f"unscripted MX {domain}"
                attempt.on_mx(domain, script.mx.get(domain, NxDomain()))
            case ResolveAddresses(host):
                assert host in script.addresses or not script.strict, f"unscripted A {host}"
                attempt.on_addresses(host, script.addresses.get(host, NxDomain()))
            case Transact(hop, recipients):
                peer = script.peers.get(hop.address)
                assert peer is not None or not script.strict, f"unexpected connect {hop.relay}"
                attempt.on_transaction((peer or accept)(hop, recipients))
    raise AssertionError("the planner did not finish")


def routing(mode: RoutingMode = RoutingMode.DIRECT, *, bounce_on_mx_5xx: bool = True,
            bounce_on_no_mx: bool = False, bounce_on_5xx: bool = False, resolve_mx: bool = False,
            abort_on_rcpt_5xx: bool = False, smarthost: str = "relay.test") -> RoutingConfig:
    return RoutingConfig(
        mode=mode,
        direct=DirectConfig(25, bounce_on_no_mx, bounce_on_mx_5xx),
        smarthost=SmarthostConfig(smarthost, 587, resolve_mx=resolve_mx,
                                  bounce_on_5xx=bounce_on_5xx),
        abort_on_rcpt_5xx=abort_on_rcpt_5xx,
    )


def failover(*hosts: tuple[str, int], mode: RoutingMode = RoutingMode.SMARTHOST,
             bounce_on_5xx: bool = False, resolve_mx: bool = False) -> RoutingConfig:
    """A smart host failover list (routing.smarthost.hosts) of (host, port) entries."""
    return RoutingConfig(
        mode=mode,
        direct=DirectConfig(25, False, True),
        smarthost=SmarthostConfig(hosts=tuple(SmarthostHost(h, p) for h, p in hosts),
                                  resolve_mx=resolve_mx, bounce_on_5xx=bounce_on_5xx),
    )


DIRECT = RoutingMode.DIRECT
SMART = RoutingMode.SMARTHOST
BOTH = RoutingMode.DIRECT_THEN_SMARTHOST

# Standard DNS of the scripted world: dest.test has MX 10 mx1 (two addresses), 20 mx2.
MX = {"dest.test": MxHosts(((20, "mx2.dest.test"), (10, "mx1.dest.test")))}
ADDRS: dict[str, AddressResult] = {
    "mx1.dest.test": Addresses(("127.0.0.11", "127.0.0.12")),
    "mx2.dest.test": Addresses(("127.0.0.13",)),
    "relay.test": Addresses(("127.0.0.21", "127.0.0.22")),
    "relay2.test": Addresses(("127.0.0.23",)),
    "relay3.test": Addresses(("127.0.0.24",)),
}
M1A = "mx1.dest.test[127.0.0.11]:25"
M1B = "mx1.dest.test[127.0.0.12]:25"
M2 = "mx2.dest.test[127.0.0.13]:25"
R1 = "relay.test[127.0.0.21]:587"
R2 = "relay.test[127.0.0.22]:587"
F2 = "relay2.test[127.0.0.23]:2525"
F3 = "relay3.test[127.0.0.24]:465"
# A failover list: relay.test on 587, relay2.test on 2525, relay3.test on 465.
LIST = (("relay.test", 587), ("relay2.test", 2525), ("relay3.test", 465))


def world(*, mx: Mapping[str, MxResult] | None = None,
          addresses: Mapping[str, AddressResult] | None = None, **peers: Peer) -> Script:
    """The standard world with overrides; peers by last address octet: p11=..., p21=..."""
    return Script(
        mx={**MX, **(mx or {})},
        addresses={**ADDRS, **(addresses or {})},
        peers={f"127.0.0.{name[1:]}": peer for name, peer in peers.items()},
    )


@dataclass(frozen=True)
class Row:
    rule: str
    script: Script
    expect: dict[str, tuple[Kind, str, str]]  # recipient -> (kind, status, relay)
    routing: RoutingConfig = field(default_factory=routing)
    recipients: tuple[str, ...] = (A,)
    contacted: list[tuple[str, tuple[str, ...]]] | None = None
    diagnostic: dict[str, str] = field(default_factory=dict)  # recipient -> expected prefix
    domain: str = "dest.test"


SENT, DEFER, BOUNCE, HELD = Kind.DELIVERED, Kind.DEFERRED, Kind.BOUNCED, Kind.HELD

ROWS = [
    # --- direct ---------------------------------------------------------------------------
    Row("direct: delivered at the preferred MX, DATA reply is the diagnostic",
        world(p11=accept), {A: (SENT, "2.0.0", M1A)},
        diagnostic={A: "smtp; 250 2.0.0 Ok: queued as 4711"}),
    Row("direct: MX hosts tried by preference, every address of each in order",
        world(p11=REFUSED, p12=REFUSED, p13=accept), {A: (SENT, "2.0.0", M2)},
        contacted=[(M1A, (A,)), (M1B, (A,)), (M2, (A,))]),
    Row("direct: NXDOMAIN bounces 5.1.2",
        world(mx={"dest.test": NxDomain()}), {A: (BOUNCE, "5.1.2", "none")},
        diagnostic={A: "dns; dest.test: no such domain"}),
    Row("direct: null MX bounces 5.1.10",
        world(mx={"dest.test": NullMx()}), {A: (BOUNCE, "5.1.10", "none")},
        diagnostic={A: "dns; dest.test accepts no mail"}),
    Row("direct: no MX delivers to the domain's own address (implicit MX)",
        world(mx={"dest.test": NoMx()}, addresses={"dest.test": Addresses(("127.0.0.14",))},
              p14=accept),
        {A: (SENT, "2.0.0", "dest.test[127.0.0.14]:25")}),
    Row("direct: no MX bounces when bounce_on_no_mx",
        world(mx={"dest.test": NoMx()}), {A: (BOUNCE, "5.4.4", "none")},
        routing=routing(bounce_on_no_mx=True)),
    Row("direct: no MX and no address bounces 5.4.4",
        world(mx={"dest.test": NoMx()}, addresses={"dest.test": NoAddresses()}),
        {A: (BOUNCE, "5.4.4", "none")}),
    Row("direct: DNS temporary failure on MX defers 4.4.3",
        world(mx={"dest.test": DnsTempFailure("timeout")}), {A: (DEFER, "4.4.3", "none")},
        diagnostic={A: "dns; timeout"}),
    Row("direct: an MX host without addresses is skipped",
        world(addresses={"mx1.dest.test": NoAddresses()}, p13=accept),
        {A: (SENT, "2.0.0", M2)}),
    Row("direct: no MX host has an address: bounce 5.4.4",
        world(addresses={"mx1.dest.test": NoAddresses(), "mx2.dest.test": NxDomain()}),
        {A: (BOUNCE, "5.4.4", "none")}, diagnostic={A: "dns; no address for any MX host"}),
    Row("direct: MX hosts without addresses and one DNS temp failure defers",
        world(addresses={"mx1.dest.test": DnsTempFailure("SERVFAIL"),
                         "mx2.dest.test": NoAddresses()}),
        {A: (DEFER, "4.4.3", "none")}),
    Row("direct: connect refused everywhere defers 4.4.1 with a local diagnostic",
        world(p11=REFUSED, p12=REFUSED, p13=REFUSED), {A: (DEFER, "4.4.1", M2)},
        diagnostic={A: f"x-deliverd; connect to {M2}: Connection refused"}),
    Row("direct: greeting timeout tries the next host",
        world(p11=TIMEOUT, p12=accept), {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 4xx greeting tries the next host",
        world(p11=fail_at(Stage.GREETING, "busy", BUSY), p12=accept), {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 5xx greeting is the host's failure: next host",
        world(p11=NO_BANNER, p12=accept),
        {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 5xx greeting at every host bounces with the last one",
        world(p11=NO_BANNER, p12=NO_BANNER, p13=NO_BANNER),
        {A: (BOUNCE, "5.3.2", M2)}, diagnostic={A: "smtp; 554 5.3.2"}),
    Row("direct: EHLO failure tries the next host",
        world(p11=fail_at(Stage.EHLO, "ehlo", Reply(502, "no", "5.5.1")), p12=accept),
        {A: (SENT, "2.0.0", M1B)}),
    Row("direct: STARTTLS failure tries the next host",
        world(p11=fail_at(Stage.STARTTLS, "handshake failed", status="4.7.5"), p12=accept),
        {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 5xx to RCPT bounces at once when bounce_on_mx_5xx",
        world(p11=rcpt({A: NO_USER})), {A: (BOUNCE, "5.1.1", M1A)},
        contacted=[(M1A, (A,))], diagnostic={A: "smtp; 550 5.1.1 No such user"}),
    Row("direct: 5xx to MAIL bounces at once when bounce_on_mx_5xx",
        world(p11=fail_at(Stage.MAIL, "mail", POLICY)), {A: (BOUNCE, "5.7.1", M1A)}),
    Row("direct: 5xx to DATA bounces at once when bounce_on_mx_5xx",
        world(p11=data(DATA_REJECTED)), {A: (BOUNCE, "5.6.0", M1A)}),
    Row("direct: 5xx to RCPT tries the next MX when bounce_on_mx_5xx is off",
        world(p11=rcpt({A: NO_USER}), p12=accept), {A: (SENT, "2.0.0", M1B)},
        routing=routing(bounce_on_mx_5xx=False)),
    Row("direct: 5xx at every MX bounces with the last 5xx when bounce_on_mx_5xx is off",
        world(p11=rcpt({A: NO_USER}), p12=fail_at(Stage.MAIL, "m", POLICY),
              p13=data(DATA_REJECTED)),
        {A: (BOUNCE, "5.6.0", M2)}, routing=routing(bounce_on_mx_5xx=False)),
    Row("direct: 5xx and a 4xx elsewhere defers when bounce_on_mx_5xx is off",
        world(p11=rcpt({A: NO_USER}), p12=rcpt({A: GREYLISTED}), p13=rcpt({A: NO_USER})),
        {A: (DEFER, "4.7.1", M1B)}, routing=routing(bounce_on_mx_5xx=False)),
    Row("direct: 4xx to MAIL tries the next host",
        world(p11=fail_at(Stage.MAIL, "m", BUSY), p12=accept), {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 4xx to RCPT tries the remaining hosts, then defers with the last 4xx",
        world(p11=rcpt({A: GREYLISTED}), p12=rcpt({A: BUSY}), p13=REFUSED),
        {A: (DEFER, "4.4.1", M2)}, contacted=[(M1A, (A,)), (M1B, (A,)), (M2, (A,))]),
    Row("direct: 4xx to RCPT then acceptance at the next host delivers",
        world(p11=rcpt({A: GREYLISTED}), p12=accept), {A: (SENT, "2.0.0", M1B)}),
    Row("direct: 4xx to DATA tries the next host",
        world(p11=data(Reply(452, "full", "4.3.1")), p12=accept), {A: (SENT, "2.0.0", M1B)}),
    Row("direct: all hosts temporary: status of the last temporary failure",
        world(p11=REFUSED, p12=rcpt({A: GREYLISTED}), p13=fail_at(Stage.GREETING, "b", BUSY)),
        {A: (DEFER, "4.3.2", M2)}),
    Row("direct: RCPT 5xx bounces one recipient, the others are delivered",
        world(p11=rcpt({B: NO_USER})), {A: (SENT, "2.0.0", M1A), B: (BOUNCE, "5.1.1", M1A),
                                        C: (SENT, "2.0.0", M1A)},
        recipients=(A, B, C), contacted=[(M1A, (A, B, C))]),
    Row("direct: RCPT 5xx recipient alone goes to the next MX when bounce_on_mx_5xx is off",
        world(p11=rcpt({B: NO_USER}), p12=accept),
        {A: (SENT, "2.0.0", M1A), B: (SENT, "2.0.0", M1B)}, recipients=(A, B),
        routing=routing(bounce_on_mx_5xx=False), contacted=[(M1A, (A, B)), (M1B, (B,))]),
    Row("direct: abort_on_rcpt_5xx bounces the refused, defers the rest without retrying them",
        world(p11=rcpt({B: NO_USER}, aborted=True)),
        {A: (DEFER, "4.5.0", M1A), B: (BOUNCE, "5.1.1", M1A), C: (DEFER, "4.5.0", M1A)},
        recipients=(A, B, C), routing=routing(abort_on_rcpt_5xx=True),
        contacted=[(M1A, (A, B, C))]),
    Row("direct: abort_on_rcpt_5xx with bounce_on_mx_5xx off: refused alone to the next MX",
        world(p11=rcpt({B: NO_USER}, aborted=True), p12=accept),
        {A: (DEFER, "4.5.0", M1A), B: (SENT, "2.0.0", M1B)}, recipients=(A, B),
        routing=routing(abort_on_rcpt_5xx=True, bounce_on_mx_5xx=False),
        contacted=[(M1A, (A, B)), (M1B, (B,))]),
    Row("direct: an MX address of our own is skipped (loop), the next one delivers",
        world(addresses={"mx1.dest.test": Addresses(("127.0.0.99", "127.0.0.12"))},
              p12=accept),
        {A: (SENT, "2.0.0", M1B)}, contacted=[(M1B, (A,))]),
    Row("direct: every MX loops back to us: held 5.4.6, nothing contacted",
        world(addresses={"mx1.dest.test": Addresses(("127.0.0.99",)),
                         "mx2.dest.test": Addresses(("::1",))}),
        {A: (HELD, "5.4.6", "mx2.dest.test[::1]:25")}, contacted=[],
        diagnostic={A: "mail loop: "}),
    Row("direct: an MX host named like us is a loop",
        world(mx={"dest.test": MxHosts(((10, "MTA.deliverd.test"),))},
              addresses={"MTA.deliverd.test": Addresses(("127.0.0.50",))}),
        {A: (HELD, "5.4.6", "MTA.deliverd.test[127.0.0.50]:25")}, contacted=[]),
    Row("direct: a greeting naming us is skipped like a loop; alone it holds",
        world(mx={"dest.test": MxHosts(((10, "mx2.dest.test"),))}, p13=LOOP),
        {A: (HELD, "5.4.6", M2)}),
    Row("direct: a loop and a temporary failure elsewhere defers",
        world(p11=LOOP, p12=LOOP, p13=REFUSED), {A: (DEFER, "4.4.1", M2)}),
    Row("direct: an address literal domain needs no DNS",
        Script(peers={"127.0.0.30": accept}),
        {"u@[127.0.0.30]": (SENT, "2.0.0", "127.0.0.30[127.0.0.30]:25")},
        recipients=("u@[127.0.0.30]",), domain="[127.0.0.30]"),
    # --- smarthost ---------------------------------------------------------------------------
    Row("smarthost: delivered at the smart host's address and port",
        world(p21=accept), {A: (SENT, "2.0.0", R1)}, routing=routing(SMART),
        contacted=[(R1, (A,))]),
    Row("smarthost: one transaction for recipients of several domains",
        world(p21=accept), {A: (SENT, "2.0.0", R1), "x@other.test": (SENT, "2.0.0", R1)},
        recipients=(A, "x@other.test"), routing=routing(SMART),
        contacted=[(R1, (A, "x@other.test"))]),
    Row("smarthost: resolve_mx delivers to the smart host's MX hosts in preference order",
        world(mx={"relay.test": MxHosts(((20, "b.relay.test"), (10, "a.relay.test")))},
              addresses={"a.relay.test": Addresses(("127.0.0.23",)),
                         "b.relay.test": Addresses(("127.0.0.24",))},
              p23=REFUSED, p24=accept),
        {A: (SENT, "2.0.0", "b.relay.test[127.0.0.24]:587")},
        routing=routing(SMART, resolve_mx=True)),
    Row("smarthost: resolve_mx on a name without MX uses its addresses",
        world(mx={"relay.test": NoMx()}, p21=accept), {A: (SENT, "2.0.0", R1)},
        routing=routing(SMART, resolve_mx=True)),
    Row("smarthost: an IP literal smart host needs no lookup",
        Script(peers={"127.0.0.25": accept}),
        {A: (SENT, "2.0.0", "127.0.0.25[127.0.0.25]:587")},
        routing=routing(SMART, smarthost="127.0.0.25")),
    Row("smarthost: connect failure tries the next smart host address",
        world(p21=REFUSED, p22=accept), {A: (SENT, "2.0.0", R2)}, routing=routing(SMART)),
    Row("smarthost: connect failure at every address defers",
        world(p21=REFUSED, p22=REFUSED), {A: (DEFER, "4.4.1", R2)}, routing=routing(SMART)),
    Row("smarthost: AUTH 535 defers (never bounces), as 4.7.8",
        world(p21=fail_at(Stage.AUTH, "auth", BAD_CREDENTIALS),
              p22=fail_at(Stage.AUTH, "auth", BAD_CREDENTIALS)),
        {A: (DEFER, "4.7.8", R2)}, routing=routing(SMART, bounce_on_5xx=True),
        diagnostic={A: "smtp; 535 5.7.8"}),
    Row("smarthost: POP-before-SMTP failure defers",
        world(p21=fail_at(Stage.POP, "-ERR authentication failed", status="5.7.8"),
              p22=fail_at(Stage.POP, "-ERR authentication failed", status="5.7.8")),
        {A: (DEFER, "4.7.8", R2)}, routing=routing(SMART, bounce_on_5xx=True)),
    Row("smarthost: TLS failure defers",
        world(p21=fail_at(Stage.STARTTLS, "certificate verify failed", status="4.7.5"),
              p22=REFUSED),
        {A: (DEFER, "4.4.1", R2)}, routing=routing(SMART)),
    Row("smarthost: 5xx greeting defers",
        world(p21=NO_BANNER, p22=REFUSED),
        {A: (DEFER, "4.4.1", R2)}, routing=routing(SMART, bounce_on_5xx=True)),
    Row("smarthost: 4xx to RCPT tries the next address, then defers",
        world(p21=rcpt({A: GREYLISTED}), p22=rcpt({A: GREYLISTED})),
        {A: (DEFER, "4.7.1", R2)}, routing=routing(SMART)),
    Row("smarthost: 5xx defers at once when bounce_on_5xx is off",
        world(p21=rcpt({A: NO_USER})), {A: (DEFER, "4.1.1", R1)}, routing=routing(SMART),
        contacted=[(R1, (A,))], diagnostic={A: "smtp; 550 5.1.1 No such user"}),
    Row("smarthost: 5xx to DATA bounces when bounce_on_5xx",
        world(p21=data(DATA_REJECTED)), {A: (BOUNCE, "5.6.0", R1)},
        routing=routing(SMART, bounce_on_5xx=True)),
    Row("smarthost: RCPT 5xx bounces one recipient when bounce_on_5xx, others delivered",
        world(p21=rcpt({B: NO_USER})), {A: (SENT, "2.0.0", R1), B: (BOUNCE, "5.1.1", R1)},
        recipients=(A, B), routing=routing(SMART, bounce_on_5xx=True)),
    Row("smarthost: abort_on_rcpt_5xx defers the others without the next address",
        world(p21=rcpt({B: NO_USER}, aborted=True)),
        {A: (DEFER, "4.5.0", R1), B: (BOUNCE, "5.1.1", R1)}, recipients=(A, B),
        routing=routing(SMART, bounce_on_5xx=True, abort_on_rcpt_5xx=True),
        contacted=[(R1, (A, B))]),
    Row("smarthost: NXDOMAIN for the smart host defers 4.4.4",
        world(addresses={"relay.test": NxDomain()}), {A: (DEFER, "4.4.4", "none")},
        routing=routing(SMART)),
    Row("smarthost: resolve_mx with NXDOMAIN defers 4.4.4",
        world(mx={"relay.test": NxDomain()}), {A: (DEFER, "4.4.4", "none")},
        routing=routing(SMART, resolve_mx=True)),
    Row("smarthost: DNS temporary failure defers 4.4.3",
        world(addresses={"relay.test": DnsTempFailure("REFUSED")}),
        {A: (DEFER, "4.4.3", "none")}, routing=routing(SMART)),
    Row("smarthost: an address of our own is a loop: held at once",
        world(addresses={"relay.test": Addresses(("127.0.0.99", "127.0.0.22"))}),
        {A: (HELD, "5.4.6", "relay.test[127.0.0.99]:587")}, routing=routing(SMART),
        contacted=[]),
    Row("smarthost: a greeting naming us holds",
        world(p21=LOOP), {A: (HELD, "5.4.6", R1)}, routing=routing(SMART),
        contacted=[(R1, (A,))]),
    # --- direct_then_smarthost ----------------------------------------------------------------
    Row("fallback: direct success never touches the smart host",
        world(p11=accept), {A: (SENT, "2.0.0", M1A)}, routing=routing(BOTH)),
    Row("fallback: NXDOMAIN hands over to the smart host",
        world(mx={"dest.test": NxDomain()}, p21=accept), {A: (SENT, "2.0.0", R1)},
        routing=routing(BOTH)),
    Row("fallback: DNS temporary failure hands over",
        world(mx={"dest.test": DnsTempFailure("t")}, p21=accept), {A: (SENT, "2.0.0", R1)},
        routing=routing(BOTH)),
    Row("fallback: MX hosts without addresses hand over",
        world(addresses={"mx1.dest.test": NoAddresses(), "mx2.dest.test": NxDomain()},
              p21=accept),
        {A: (SENT, "2.0.0", R1)}, routing=routing(BOTH)),
    Row("fallback: connect failures at every MX, then the smart host",
        world(p11=REFUSED, p12=TIMEOUT, p13=REFUSED, p21=accept), {A: (SENT, "2.0.0", R1)},
        routing=routing(BOTH),
        contacted=[(M1A, (A,)), (M1B, (A,)), (M2, (A,)), (R1, (A,))]),
    Row("fallback: 4xx hands over",
        world(p11=rcpt({A: GREYLISTED}), p12=rcpt({A: GREYLISTED}), p13=REFUSED, p21=accept),
        {A: (SENT, "2.0.0", R1)}, routing=routing(BOTH)),
    Row("fallback: 5xx under bounce_on_mx_5xx bounces, the smart host is not asked",
        world(p11=rcpt({A: NO_USER})), {A: (BOUNCE, "5.1.1", M1A)}, routing=routing(BOTH),
        contacted=[(M1A, (A,))]),
    Row("fallback: 5xx without bounce_on_mx_5xx hands over",
        world(p11=rcpt({A: NO_USER}), p12=rcpt({A: NO_USER}), p13=rcpt({A: NO_USER}),
              p21=accept),
        {A: (SENT, "2.0.0", R1)}, routing=routing(BOTH, bounce_on_mx_5xx=False)),
    Row("fallback: null MX bounces",
        world(mx={"dest.test": NullMx()}), {A: (BOUNCE, "5.1.10", "none")},
        routing=routing(BOTH)),
    Row("fallback: bounce_on_no_mx bounces",
        world(mx={"dest.test": NoMx()}), {A: (BOUNCE, "5.4.4", "none")},
        routing=routing(BOTH, bounce_on_no_mx=True)),
    Row("fallback: the smart host's 4xx is final: deferred via the smart host",
        world(p11=REFUSED, p12=REFUSED, p13=REFUSED, p21=rcpt({A: BUSY}), p22=REFUSED),
        {A: (DEFER, "4.4.1", R2)}, routing=routing(BOTH)),
    Row("fallback: the smart host's 5xx defers when bounce_on_5xx is off",
        world(mx={"dest.test": NxDomain()}, p21=rcpt({A: NO_USER})),
        {A: (DEFER, "4.1.1", R1)}, routing=routing(BOTH)),
    Row("fallback: the smart host's 5xx bounces when bounce_on_5xx",
        world(mx={"dest.test": NxDomain()}, p21=rcpt({A: NO_USER})),
        {A: (BOUNCE, "5.1.1", R1)}, routing=routing(BOTH, bounce_on_5xx=True)),
    Row("fallback: only the recipients direct did not finish go to the smart host",
        world(p11=rcpt({B: GREYLISTED}), p12=rcpt({B: GREYLISTED}), p13=rcpt({B: BUSY}),
              p21=accept),
        {A: (SENT, "2.0.0", M1A), B: (SENT, "2.0.0", R1)}, recipients=(A, B),
        routing=routing(BOTH),
        contacted=[(M1A, (A, B)), (M1B, (B,)), (M2, (B,)), (R1, (B,))]),
    Row("fallback: every MX looping holds, not handed over",
        world(addresses={"mx1.dest.test": Addresses(("127.0.0.99",)),
                         "mx2.dest.test": NoAddresses()}),
        {A: (HELD, "5.4.6", "mx1.dest.test[127.0.0.99]:25")}, routing=routing(BOTH),
        contacted=[]),
    Row("fallback: recipients deferred by an abort are not handed over",
        world(p11=rcpt({B: NO_USER}, aborted=True)),
        {A: (DEFER, "4.5.0", M1A), B: (BOUNCE, "5.1.1", M1A)}, recipients=(A, B),
        routing=routing(BOTH, abort_on_rcpt_5xx=True), contacted=[(M1A, (A, B))]),
]

ROWS += [
    # --- smart host failover list (routing.smarthost.hosts) -------------------------------
    Row("list: the first host delivers, the others are never resolved",
        Script(addresses={"relay.test": ADDRS["relay.test"]}, peers={"127.0.0.21": accept}),
        {A: (SENT, "2.0.0", R1)}, routing=failover(*LIST), contacted=[(R1, (A,))]),
    Row("list: connect refused, then 421 greeting, then the third host on its own port",
        world(p21=REFUSED, p22=REFUSED, p23=fail_at(Stage.GREETING, "busy", BUSY),
              p24=accept),
        {A: (SENT, "2.0.0", F3)}, routing=failover(*LIST),
        contacted=[(R1, (A,)), (R2, (A,)), (F2, (A,)), (F3, (A,))]),
    Row("list: a TLS or AUTH failure moves on to the next host",
        world(p21=fail_at(Stage.AUTH, "auth refused", BAD_CREDENTIALS),
              p22=fail_at(Stage.STARTTLS, "certificate verify failed"), p23=accept),
        {A: (SENT, "2.0.0", F2)}, routing=failover(*LIST),
        contacted=[(R1, (A,)), (R2, (A,)), (F2, (A,))]),
    Row("list: a host without an address or with a DNS failure is passed over",
        world(addresses={"relay.test": NxDomain(), "relay2.test": DnsTempFailure("SERVFAIL")},
              p24=accept),
        {A: (SENT, "2.0.0", F3)}, routing=failover(*LIST), contacted=[(F3, (A,))]),
    Row("list: every host failing defers with the last host's reason, never bounces",
        world(p21=REFUSED, p22=REFUSED, p23=REFUSED, p24=fail_at(Stage.GREETING, "no", NO_SERVICE)),
        {A: (DEFER, "4.3.2", F3)}, routing=failover(*LIST, bounce_on_5xx=True)),
    Row("list: a 5xx to RCPT is final for the attempt (bounce_on_5xx), no next host",
        world(p21=rcpt({A: NO_USER})), {A: (BOUNCE, "5.1.1", R1)},
        routing=failover(*LIST, bounce_on_5xx=True), contacted=[(R1, (A,))]),
    Row("list: a 5xx to DATA defers without trying the next host (bounce_on_5xx off)",
        world(p21=data(DATA_REJECTED)), {A: (DEFER, "4.6.0", R1)},
        routing=failover(*LIST), contacted=[(R1, (A,))]),
    Row("list: resolve_mx resolves each entry as a domain, in list order",
        world(mx={"relay.test": NxDomain(), "relay2.test": MxHosts(((5, "mx.relay2.test"),)),
                  "relay3.test": NoMx()},
              addresses={"mx.relay2.test": Addresses(("127.0.0.25",))},
              p25=REFUSED, p24=accept),
        {A: (SENT, "2.0.0", F3)}, routing=failover(*LIST, resolve_mx=True),
        contacted=[("mx.relay2.test[127.0.0.25]:2525", (A,)), (F3, (A,))]),
    Row("list: fallback mode hands over to the list after direct failed",
        world(p11=REFUSED, p12=REFUSED, p13=REFUSED, p21=REFUSED, p22=REFUSED, p23=accept),
        {A: (SENT, "2.0.0", F2)}, routing=failover(*LIST, mode=BOTH)),
    Row("list: a list entry that is this host holds (mail loop)",
        world(addresses={"relay.test": Addresses(("127.0.0.99",))}),
        {A: (HELD, "5.4.6", "relay.test[127.0.0.99]:587")}, routing=failover(*LIST),
        contacted=[]),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.rule for row in ROWS])
def test_planner_rule(row: Row) -> None:
    attempt = Attempt(domain=row.domain, recipients=row.recipients, routing=row.routing,
                      host=ME, rng=random.Random(0))
    run = drive(attempt, row.script)
    got = {r: (o.kind, o.status, o.relay) for r, o in run.outcomes.items()}
    assert got == row.expect
    if row.contacted is not None:
        assert run.contacted == row.contacted
    for recipient, prefix in row.diagnostic.items():
        assert run.outcomes[recipient].diagnostic.startswith(prefix)
    for outcome in run.outcomes.values():
        assert outcome.route in (None, Route.DIRECT, Route.SMARTHOST)
        if outcome.hop is not None and row.routing.smarthost is not None:
            ports = {t.port for t in row.routing.smarthost.targets}
            assert outcome.hop.port in (ports if outcome.route is Route.SMARTHOST else {25})


CACHED = SessionFailure(Stage.CONNECT, "host recently failed to connect (cached)", cached=True)


def _drive_with_cache(routing_cfg: RoutingConfig, cached: set[str], works: set[str]
                      ) -> tuple[Outcome, list[Transact]]:
    """Hosts in ``cached`` answer from the failure cache unless asked to ignore it."""
    attempt = Attempt(domain="dest.test", recipients=(A,), routing=routing_cfg, host=ME,
                      rng=random.Random(0))
    sent: list[Transact] = []
    while not isinstance(action := attempt.next_action(), Finished):
        if isinstance(action, ResolveAddresses):
            attempt.on_addresses(action.host, ADDRS[action.host])
        elif isinstance(action, Transact):
            sent.append(action)
            hop = action.hop
            if hop.address in cached and not action.ignore_failure_cache:
                attempt.on_transaction(Result(hop, failure=CACHED))
            elif hop.address in works:
                attempt.on_transaction(accept(hop, action.recipients))
            else:
                attempt.on_transaction(REFUSED(hop, action.recipients))
        else:
            raise AssertionError(f"unexpected {action}")
    [outcome] = action.outcomes
    return outcome, sent


def test_a_failover_list_whose_hosts_are_all_cached_as_failed_is_tried_anyway() -> None:
    every = {"127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"}
    outcome, sent = _drive_with_cache(failover(*LIST), cached=every, works={"127.0.0.24"})
    assert outcome.kind is Kind.DELIVERED and outcome.relay == F3
    assert [a.ignore_failure_cache for a in sent] == [False] * 4 + [True] * 4


def test_a_cached_host_of_a_list_is_skipped_while_another_answers() -> None:
    outcome, sent = _drive_with_cache(failover(*LIST), cached={"127.0.0.21", "127.0.0.22"},
                                      works={"127.0.0.23"})
    assert outcome.kind is Kind.DELIVERED and outcome.relay == F2
    assert not any(a.ignore_failure_cache for a in sent)


def test_a_single_smart_host_cached_as_failed_is_not_retried_in_the_same_attempt() -> None:
    outcome, sent = _drive_with_cache(routing(SMART), cached={"127.0.0.21", "127.0.0.22"},
                                      works={"127.0.0.21"})
    assert outcome.kind is Kind.DEFERRED
    assert not any(a.ignore_failure_cache for a in sent)


def test_delivered_outcome_carries_hop_route_and_transcript() -> None:
    attempt = Attempt(domain="dest.test", recipients=(A,), routing=routing(), host=ME)
    outcome = drive(attempt, world(p11=accept)).outcomes[A]
    assert outcome.hop == Hop("mx1.dest.test", "127.0.0.11", 25, Route.DIRECT, 10)
    assert outcome.transcript == ("S: 250 queued",)


def test_equal_preferences_are_shuffled_by_the_injected_rng() -> None:
    mx: dict[str, MxResult] = {
        "dest.test": MxHosts(((10, "a.dest.test"), (10, "b.dest.test"), (5, "c.dest.test")))}
    addresses: dict[str, AddressResult] = {
        "a.dest.test": Addresses(("127.0.0.41",)), "b.dest.test": Addresses(("127.0.0.42",)),
        "c.dest.test": Addresses(("127.0.0.43",))}
    firsts = set()
    for seed in range(40):
        attempt = Attempt(domain="dest.test", recipients=(A,), routing=routing(), host=ME,
                          rng=random.Random(seed))
        run = drive(attempt, Script(mx, addresses, {
            "127.0.0.41": REFUSED, "127.0.0.42": REFUSED, "127.0.0.43": REFUSED}))
        order = [relay.split("[")[0] for relay, _ in run.contacted]
        assert order[0] == "c.dest.test"  # preference 5 always first
        firsts.add(order[1])
    assert firsts == {"a.dest.test", "b.dest.test"}


def test_same_seed_gives_same_order() -> None:
    records = tuple((10, f"h{i}.test") for i in range(8))
    assert order_mx(records, random.Random(7)) == order_mx(records, random.Random(7))


def test_next_action_repeats_until_its_result_arrives() -> None:
    attempt = Attempt(domain="dest.test", recipients=(A,), routing=routing(), host=ME)
    assert attempt.next_action() == attempt.next_action() == ResolveMx("dest.test")


def test_a_result_for_an_action_not_asked_for_is_refused() -> None:
    attempt = Attempt(domain="dest.test", recipients=(A,), routing=routing(), host=ME)
    attempt.next_action()
    with pytest.raises(ValueError, match="unexpected"):
        attempt.on_addresses("dest.test", Addresses(("127.0.0.1",)))


def test_no_recipients_finishes_at_once() -> None:
    attempt = Attempt(domain="dest.test", recipients=(), routing=routing(), host=ME)
    assert attempt.next_action() == Finished(())


def test_duplicate_recipients_get_one_outcome() -> None:
    attempt = Attempt(domain="dest.test", recipients=(A, A, B), routing=routing(), host=ME)
    run = drive(attempt, world(p11=accept))
    assert list(run.outcomes) == [A, B]
    assert run.contacted == [(M1A, (A, B))]


def test_smarthost_mode_without_smarthost_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs routing\.smarthost"):
        Attempt(domain="d.test", recipients=(A,), routing=RoutingConfig(mode=SMART), host=ME)


@pytest.mark.parametrize(("recipients", "expected"), [
    (["a@Example.COM", "b@example.com", "c@other.test"],
     {"example.com": ["a@Example.COM", "b@example.com"], "other.test": ["c@other.test"]}),
    (["x@bücher.example", "y@XN--BCHER-KVA.example"],
     {"xn--bcher-kva.example": ["x@bücher.example", "y@XN--BCHER-KVA.example"]}),
    (['"odd@local"@dest.test', "postmaster"],
     {"dest.test": ['"odd@local"@dest.test'], "": ["postmaster"]}),
    (["u@dest.test.", "v@dest.test"], {"dest.test": ["u@dest.test.", "v@dest.test"]}),
])
def test_group_by_domain_lowercases_and_idna_encodes(
    recipients: list[str], expected: dict[str, list[str]]
) -> None:
    assert group_by_domain(recipients) == expected


@pytest.mark.parametrize(("reply", "status"), [
    (Reply(550, "x", "5.1.1"), "5.1.1"),
    (Reply(450, "x", "5.1.1"), "4.1.1"),  # the reply code decides the class
    (Reply(554, "x"), "5.0.0"),
    (Reply(421, "x", "garbage"), "4.0.0"),
])
def test_status_for_reply(reply: Reply, status: str) -> None:
    assert status_for(reply) == status


def test_as_temporary_keeps_the_detail() -> None:
    assert as_temporary("5.7.8") == "4.7.8"
    assert as_temporary("4.4.1") == "4.4.1"


# --- property: every recipient gets exactly one outcome, and the planner terminates ---------

REPLIES = st.sampled_from([OK, QUEUED, GREYLISTED, BUSY, NO_USER, POLICY, DATA_REJECTED])
STAGES = st.sampled_from(list(Stage))


@st.composite
def peers(draw: st.DrawFn) -> Peer:
    kind = draw(st.sampled_from(["accept", "fail", "rcpt", "loop"]))
    if kind == "accept":
        return accept
    if kind == "loop":
        return LOOP
    if kind == "fail":
        reply = draw(st.none() | REPLIES.filter(lambda r: not r.is_positive))
        return fail_at(draw(STAGES), "scripted", reply, draw(st.sampled_from(["4.4.1", "5.7.8"])))
    replies = draw(st.dictionaries(st.sampled_from([A, B, C]), REPLIES, max_size=3))
    return rcpt(replies, draw(REPLIES), aborted=draw(st.booleans()))


ADDRESS = st.sampled_from([f"127.0.0.{i}" for i in (11, 12, 13, 99)] + ["::1"])
ADDRESS_RESULTS = st.one_of(
    st.builds(Addresses, st.lists(ADDRESS, min_size=1, max_size=3).map(tuple)),
    st.sampled_from([NoAddresses(), NxDomain(), DnsTempFailure("scripted")]),
)
NAMES = st.sampled_from(["mx1.dest.test", "mx2.dest.test", "dest.test", "relay.test"])
MX_RESULTS = st.one_of(
    st.builds(MxHosts, st.lists(st.tuples(st.integers(0, 30), NAMES), max_size=4).map(tuple)),
    st.sampled_from([NullMx(), NoMx(), NxDomain(), DnsTempFailure("scripted")]),
)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(list(RoutingMode)),
    flags=st.lists(st.booleans(), min_size=5, max_size=5),
    recipients=st.lists(st.sampled_from([A, B, C]), min_size=1, max_size=4),
    mx=st.dictionaries(st.sampled_from(["dest.test", "relay.test"]), MX_RESULTS),
    addresses=st.dictionaries(NAMES, ADDRESS_RESULTS),
    peer_map=st.dictionaries(ADDRESS, peers()),
    seed=st.integers(0, 2**16),
)
def test_every_recipient_gets_exactly_one_outcome_and_the_planner_terminates(
    mode: RoutingMode, flags: list[bool], recipients: list[str], mx: dict[str, MxResult],
    addresses: dict[str, AddressResult], peer_map: dict[str, Peer], seed: int,
) -> None:
    config = routing(mode, bounce_on_mx_5xx=flags[0], bounce_on_no_mx=flags[1],
                     bounce_on_5xx=flags[2], resolve_mx=flags[3], abort_on_rcpt_5xx=flags[4])
    attempt = Attempt(domain="dest.test", recipients=recipients, routing=config, host=ME,
                      rng=random.Random(seed))
    run = drive(attempt, Script(mx, addresses, peer_map, strict=False))
    assert sorted(run.outcomes) == sorted(set(recipients))
    for outcome in run.outcomes.values():
        expected_class = {SENT: "2", DEFER: "4", BOUNCE: "5", HELD: "5"}[outcome.kind]
        assert outcome.status.startswith(expected_class), outcome
        if outcome.hop is not None:
            assert outcome.hop.address not in ME.addresses or outcome.kind is HELD
    transacted = [a for a in run.actions if isinstance(a, Transact)]
    for action in transacted:
        assert action.hop.address not in ME.addresses, "never delivered into ourselves"
        assert action.recipients, "no empty transaction"
