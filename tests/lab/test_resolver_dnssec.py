"""The resolver against the DNSSEC lab's validating Unbound: the AD bit is asked for and kept,
TLSA records count only when validated, bogus data is a temporary failure."""

from __future__ import annotations

import pytest

from deliverd.dns.resolver import (
    Addresses,
    DnsTempFailure,
    MxHosts,
    NoTlsa,
    Resolver,
    TlsaRecords,
)
from tests.fixtures.dnssec import DnssecLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_validated_answers_are_marked_secure(dnssec_lab: DnssecLab) -> None:
    resolver = Resolver([dnssec_lab.resolver], timeout=5, dnssec=True)
    mx = await resolver.mx("secure.test")
    assert isinstance(mx, MxHosts) and mx.secure
    addresses = await resolver.addresses("mx.secure.test")
    assert isinstance(addresses, Addresses) and addresses.secure
    tlsa = await resolver.tlsa("mx.secure.test")
    assert isinstance(tlsa, TlsaRecords)
    [(usage, selector, mtype, data)] = tlsa.records
    assert f"{usage} {selector} {mtype} {data.hex()}" == dnssec_lab.tlsa


async def test_without_asking_for_dnssec_nothing_is_secure(dnssec_lab: DnssecLab) -> None:
    resolver = Resolver([dnssec_lab.resolver], timeout=5)  # the trap: AD only when asked
    mx = await resolver.mx("secure.test")
    assert isinstance(mx, MxHosts) and not mx.secure
    assert await resolver.tlsa("mx.secure.test") == NoTlsa(False)


async def test_unsigned_tlsa_is_as_if_none(dnssec_lab: DnssecLab) -> None:
    resolver = Resolver([dnssec_lab.resolver], timeout=5, dnssec=True)
    mx = await resolver.mx("insecure.test")
    assert isinstance(mx, MxHosts) and not mx.secure
    assert await resolver.tlsa("mx.insecure.test") == NoTlsa(False)


async def test_authenticated_denial_of_tlsa(dnssec_lab: DnssecLab) -> None:
    resolver = Resolver([dnssec_lab.resolver], timeout=5, dnssec=True)
    assert await resolver.tlsa("mx-nodane.secure.test") == NoTlsa(True)


async def test_bogus_tlsa_is_a_temporary_failure(dnssec_lab: DnssecLab) -> None:
    resolver = Resolver([dnssec_lab.resolver], timeout=5, dnssec=True)
    assert isinstance(await resolver.tlsa("mx.bogus.test"), DnsTempFailure)
    mx = await resolver.mx("bogus.test")
    assert isinstance(mx, MxHosts) and mx.secure  # the rest of the zone still validates
