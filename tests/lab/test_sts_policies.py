"""MTA-STS policy cache rules (RFC 8461 §5.1) over real DNS (dnsmasq) and the real queue
database; the HTTPS fetch is replaced to count calls and to fail on demand (the fetch itself is
proven against a real HTTPS server in test_mta_sts_delivery.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deliverd.delivery.sts_policies import FetchError, StsPolicies
from deliverd.dns.resolver import Resolver
from deliverd.queue.store import QueueStore
from deliverd.smtp.mta_sts import StsMode
from tests.fixtures.dns import DnsServer

pytestmark = pytest.mark.integration

ZONE = (
    'txt-record=_mta-sts.cache.test,"v=STSv1; id=2"',
    "host-record=mta-sts.cache.test,127.0.0.79",
)
POLICY = "version: STSv1\nmode: enforce\nmx: mx.cache.test\nmax_age: 100\n"
OLD = POLICY.replace("enforce", "testing")


@pytest.fixture(scope="module")
def zone(session_dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    return session_dns_server_factory(ZONE)


class Fetcher:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self, host: str, address: str) -> str:
        self.calls += 1
        assert (host, address) == ("mta-sts.cache.test", "127.0.0.79")
        if self.fail:
            raise FetchError("connection refused")
        return POLICY


async def test_cache_rules(zone: DnsServer, tmp_path: Path) -> None:
    now = [1000.0]
    fetch = Fetcher()
    store = await QueueStore.open(tmp_path)
    try:
        policies = StsPolicies(Resolver([zone.nameserver], timeout=5), store, fetch=fetch,
                               clock=lambda: now[0])
        # an older policy (id 1) is cached; DNS now announces id 2, but the fetch fails:
        await store.store_sts_policy("cache.test", ("1", OLD, 900.0, 1050.0))
        fetch.fail = True
        served = await policies.policy("cache.test")
        assert served is not None and served.mode is StsMode.TESTING and fetch.calls == 1
        # the fetch works again: the new policy replaces the old one
        fetch.fail = False
        served = await policies.policy("cache.test")
        assert served is not None and served.mode is StsMode.ENFORCE and fetch.calls == 2
        # same id as the cached policy: no fetch at all
        assert await policies.policy("cache.test") == served and fetch.calls == 2
        # expired (max_age 100) and the refresh fails: nothing is served any more
        now[0] = 1101.0
        fetch.fail = True
        assert await policies.policy("cache.test") is None and fetch.calls == 3
    finally:
        await store.close()
