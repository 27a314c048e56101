"""The resolver against real DNS servers on loopback: dnsmasq (the lab zone) and, for answers
dnsmasq will not give (SERVFAIL, truncation, hostile records), a scripted UDP server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

import deliverd.dns.resolver as resolver_module
from deliverd.dns.resolver import (
    Addresses,
    DnsTempFailure,
    MxHosts,
    NoAddresses,
    NoMx,
    NullMx,
    NxDomain,
    Resolver,
    ascii_domain,
    parse_nameserver,
)
from deliverd_lab.common import LabError
from tests.fixtures.dns import LAB_ZONE, DnsServer, start_dnsmasq

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(lab_dns: DnsServer) -> Resolver:
    return Resolver([lab_dns.nameserver], timeout=3)


async def test_mx_records_come_back_as_published_not_sorted(lab: Resolver) -> None:
    result = await lab.mx("mx.test")
    assert isinstance(result, MxHosts)
    assert sorted(result.records) == [(10, "mx1.mx.test"), (10, "mx2.mx.test"),
                                      (20, "mx3.mx.test")]


async def test_equal_preferences_are_both_returned(lab: Resolver) -> None:
    result = await lab.mx("equal.test")
    assert isinstance(result, MxHosts)
    assert sorted(result.records) == [(10, "a.equal.test"), (10, "b.equal.test")]


async def test_null_mx_is_recognised(lab: Resolver) -> None:
    assert await lab.mx("nullmx.test") == NullMx()


async def test_nxdomain_for_mx_and_addresses(lab: Resolver) -> None:
    assert await lab.mx("nxdomain.test") == NxDomain()
    assert await lab.addresses("nxdomain.test") == NxDomain()


async def test_domain_without_mx_but_with_a_record(lab: Resolver) -> None:
    assert await lab.mx("nomx.test") == NoMx()
    assert await lab.addresses("nomx.test") == Addresses(("127.0.0.14",))


async def test_aaaa_only_host(lab: Resolver) -> None:
    assert await lab.addresses("v6.test") == Addresses(("::1",))


async def test_ipv4_addresses_come_before_ipv6(lab: Resolver) -> None:
    assert await lab.addresses("dual.test") == Addresses(("127.0.0.17", "::1"))


async def test_mx_host_without_addresses(lab: Resolver) -> None:
    assert await lab.mx("mxnoaddr.test") == MxHosts(((10, "noaddr.mxnoaddr.test"),))
    assert await lab.addresses("noaddr.mxnoaddr.test") == NoAddresses()


async def test_refused_is_a_prompt_temporary_failure(lab: Resolver) -> None:
    started = time.monotonic()
    mx = await lab.mx("servfail.example")
    addresses = await lab.addresses("servfail.example")
    assert isinstance(mx, DnsTempFailure) and "REFUSED" in mx.reason
    assert isinstance(addresses, DnsTempFailure)
    assert time.monotonic() - started < 2


async def test_silent_nameserver_times_out_as_temporary_failure() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # holds the port; nothing ever answers
        resolver = Resolver([f"127.0.0.1:{silent.getsockname()[1]}"], timeout=1)
        started = time.monotonic()
        result = await resolver.mx("mx.test")
        elapsed = time.monotonic() - started
    assert isinstance(result, DnsTempFailure) and "timed out" in result.reason
    assert elapsed < 3


async def test_ip_literal_needs_no_dns() -> None:
    resolver = Resolver(["127.0.0.1:9"], timeout=1)  # nothing listens there
    assert await resolver.addresses("127.0.0.5") == Addresses(("127.0.0.5",))
    assert await resolver.addresses("[IPv6:::1]") == Addresses(("::1",))


async def test_unicode_domain_is_idna_encoded(
    dns_server_factory: Callable[[Sequence[str]], DnsServer],
) -> None:
    server = dns_server_factory(["mx-host=xn--bcher-kva.test,mx.xn--bcher-kva.test,5"])
    resolver = Resolver([server.nameserver], timeout=3)
    assert await resolver.mx("bücher.test") == MxHosts(((5, "mx.xn--bcher-kva.test"),))


async def test_cached_answers_survive_the_server_going_away(
    dns_server_factory: Callable[[Sequence[str]], DnsServer],
) -> None:
    server = dns_server_factory(LAB_ZONE)
    resolver = Resolver([server.nameserver], timeout=1)
    mx = await resolver.mx("mx.test")
    nx = await resolver.mx("nxdomain.test")
    addresses = await resolver.addresses("dual.test")
    server.stop()
    assert await resolver.mx("mx.test") == mx
    assert await resolver.mx("nxdomain.test") == nx == NxDomain()
    assert await resolver.addresses("dual.test") == addresses
    uncached = Resolver([server.nameserver], timeout=1, cache=False)
    assert isinstance(await uncached.mx("mx.test"), DnsTempFailure)


async def test_cache_entries_expire_with_their_ttl(
    dns_server_factory: Callable[[Sequence[str]], DnsServer],
) -> None:
    now = [1000.0]
    server = dns_server_factory(LAB_ZONE)  # local-ttl=60
    resolver = Resolver([server.nameserver], timeout=1, clock=lambda: now[0])
    assert isinstance(await resolver.mx("mx.test"), MxHosts)
    server.stop()
    now[0] += 59
    assert isinstance(await resolver.mx("mx.test"), MxHosts)
    now[0] += 2
    assert isinstance(await resolver.mx("mx.test"), DnsTempFailure)


# --- a scripted UDP server for answers dnsmasq does not give ---------------------------------

Handler = Callable[[dns.message.Message], dns.message.Message]


class _Scripted(asyncio.DatagramProtocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.queries: list[dns.message.Message] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        self.queries.append(query)
        assert self.transport is not None
        self.transport.sendto(self.handler(query).to_wire(), addr)


StartDns = Callable[[Handler], Awaitable[tuple[Resolver, _Scripted]]]


@pytest.fixture
async def scripted_dns() -> AsyncIterator[StartDns]:
    """Start a UDP DNS server on loopback answering with ``handler``; a Resolver pointed at it."""
    transports: list[asyncio.DatagramTransport] = []

    async def start(handler: Handler) -> tuple[Resolver, _Scripted]:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Scripted(handler), local_addr=("127.0.0.1", 0))
        transports.append(transport)
        port = transport.get_extra_info("sockname")[1]
        return Resolver([f"127.0.0.1:{port}"], timeout=1), protocol

    yield start
    for transport in transports:
        transport.close()


def answer(query: dns.message.Message, *records: str, rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
           truncated: bool = False) -> dns.message.Message:
    """A response to ``query`` with records given as "name TYPE rdata" strings."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for text in records:
        name, rdtype, rdata = text.split(" ", 2)
        response.answer.append(dns.rrset.from_text(name, 60, "IN", rdtype, rdata))
    if truncated:
        response.flags |= dns.flags.TC
    return response


async def test_servfail_is_a_temporary_failure(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(lambda q: answer(q, rcode=dns.rcode.SERVFAIL))
    result = await resolver.mx("dest.test")
    assert isinstance(result, DnsTempFailure) and "SERVFAIL" in result.reason


async def test_truncated_answer_without_tcp_is_a_temporary_failure(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(lambda q: answer(q, truncated=True))
    assert isinstance(await resolver.mx("dest.test"), DnsTempFailure)


async def test_mx_targets_that_are_addresses_are_not_followed(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(
        lambda q: answer(q, "dest.test. MX 10 127.0.0.1.", "dest.test. MX 20 mx.dest.test."))
    assert await resolver.mx("dest.test") == MxHosts(((20, "mx.dest.test"),))


async def test_only_address_targets_is_a_temporary_failure(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(lambda q: answer(q, "dest.test. MX 10 127.0.0.1."))
    assert isinstance(await resolver.mx("dest.test"), DnsTempFailure)


async def test_null_mx_beside_real_mx_is_ignored(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(
        lambda q: answer(q, "dest.test. MX 0 .", "dest.test. MX 10 mx.dest.test."))
    assert await resolver.mx("dest.test") == MxHosts(((10, "mx.dest.test"),))


async def test_cname_chain_is_followed_to_its_records(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(lambda q: answer(
        q, "www.dest.test. CNAME a.dest.test.", "a.dest.test. CNAME b.dest.test.",
        "b.dest.test. A 127.0.0.40") if q.question[0].rdtype == 1 else answer(
        q, "www.dest.test. CNAME a.dest.test.", "a.dest.test. CNAME b.dest.test."))
    assert await resolver.addresses("www.dest.test") == Addresses(("127.0.0.40",))


async def test_answer_for_another_name_is_no_records(scripted_dns: StartDns) -> None:
    resolver, _ = await scripted_dns(lambda q: answer(q, "evil.test. A 127.0.0.66"))
    assert await resolver.addresses("dest.test") == NoAddresses()


async def test_temporary_failures_are_not_cached(scripted_dns: StartDns) -> None:
    replies = iter([dns.rcode.REFUSED, dns.rcode.NOERROR])
    resolver, server = await scripted_dns(lambda q: answer(
        q, "dest.test. MX 10 mx.dest.test.") if next(replies) == dns.rcode.NOERROR
        else answer(q, rcode=dns.rcode.REFUSED))
    assert isinstance(await resolver.mx("dest.test"), DnsTempFailure)
    assert await resolver.mx("dest.test") == MxHosts(((10, "mx.dest.test"),))
    assert len(server.queries) == 2


async def test_malformed_name_is_nxdomain_without_a_query(scripted_dns: StartDns) -> None:
    resolver, server = await scripted_dns(lambda q: answer(q))
    assert await resolver.mx("a..b.test") == NxDomain()
    assert await resolver.addresses("x" * 70 + ".test") == NxDomain()
    assert await resolver.mx("") == NxDomain()
    assert await resolver.mx(".") == NxDomain()
    assert server.queries == []


# --- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "address", "port"), [
    ("127.0.0.1", "127.0.0.1", 53),
    ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("::1", "::1", 53),
    ("[::1]:5353", "::1", 5353),
    ("[::1]", "::1", 53),
])
def test_nameserver_forms(spec: str, address: str, port: int) -> None:
    nameserver = parse_nameserver(spec)
    assert (nameserver.address, nameserver.port) == (address, port)


@pytest.mark.parametrize("spec", ["dns.example", "127.0.0.1:0", "[::1]x", "127.0.0.1:x"])
def test_bad_nameserver_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(spec)


@pytest.mark.parametrize(("domain", "expected"), [
    ("Example.COM.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
])
def test_ascii_domain(domain: str, expected: str) -> None:
    assert ascii_domain(domain) == expected


async def test_cache_is_bounded(scripted_dns: StartDns, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver_module, "MAX_CACHE_ENTRIES", 2)
    resolver, _ = await scripted_dns(lambda q: answer(q, f"{q.question[0].name} MX 10 mx.test."))
    for name in ("a.test", "b.test", "c.test"):
        assert isinstance(await resolver.mx(name), MxHosts)
    assert len(resolver._cache) == 2


def test_dnsmasq_that_cannot_start_fails_loudly_with_its_stderr(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="bad option"):
        start_dnsmasq(tmp_path, ["no-such-option=1"])
