"""MTA-STS policies (RFC 8461) for recipient domains: discovered, fetched, cached, served.

``StsPolicies.policy(domain)`` returns the policy that applies now, or None:

1. the TXT record ``_mta-sts.<domain>`` (exactly one ``v=STSv1``) gives the policy id; an id
   equal to the cached policy's means no fetch (RFC 8461 §5.1);
2. otherwise ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` is fetched with a certificate
   verified against the system trust store (OpenSSL's ``SSL_CERT_FILE`` points it elsewhere),
   no redirects, status 200, ``text/plain``, at most 64 KiB, parsed strictly;
3. a good policy is kept in the queue database until ``max_age`` runs out; when the TXT lookup
   or the fetch fails, or the record disappears, the cached policy is served until it expires.

The fetch uses the standard library's ``http.client``: it never follows redirects, and it lets
the connection go to the address the engine's own resolver (the spec's nameservers) found, while
TLS still checks the certificate against ``mta-sts.<domain>``.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import ssl
import time
from collections.abc import Callable

from deliverd.dns.resolver import Addresses, DnsTempFailure, Resolver, TxtRecords
from deliverd.queue.database import TlsResultKey
from deliverd.queue.store import QueueStore
from deliverd.smtp.mta_sts import MAX_POLICY_BYTES, Policy, PolicyError, parse_policy, parse_txt

log = logging.getLogger("deliverd")

FETCH_TIMEOUT = 30.0
HTTPS_PORT = 443


class FetchError(Exception):
    """The policy could not be fetched or was not acceptable."""


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a given address, with SNI and the certificate check for the policy host."""

    def __init__(self, host: str, address: str, context: ssl.SSLContext, timeout: float
                 ) -> None:
        super().__init__(host, HTTPS_PORT, context=context, timeout=timeout)
        self._address = address
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, HTTPS_PORT), self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def fetch_policy_text(host: str, address: str, timeout: float = FETCH_TIMEOUT) -> str:
    """GET the policy file over verified HTTPS; raises ``FetchError`` with the reason."""
    context = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    conn = _PinnedHTTPS(host, address, context, timeout)
    try:
        conn.request("GET", "/.well-known/mta-sts.txt", headers={"Accept": "text/plain"})
        response = conn.getresponse()
        if response.status != 200:  # 3xx included: RFC 8461 §3.3 forbids following redirects
            raise FetchError(f"HTTP status {response.status}")
        ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise FetchError(f"content type {ctype or 'missing'!r}, not text/plain")
        body = response.read(MAX_POLICY_BYTES + 1)
        if len(body) > MAX_POLICY_BYTES:
            raise FetchError("policy larger than 64 KiB")
        return body.decode("utf-8")
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
        raise FetchError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


class StsPolicies:
    """The policy source for delivery attempts; see the module docstring."""

    def __init__(
        self,
        resolver: Resolver,
        store: QueueStore,
        *,
        fetch: Callable[[str, str], str] = fetch_policy_text,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._store = store
        self._fetch = fetch
        self._clock = clock

    async def count_result(self, key: TlsResultKey, policy: str) -> None:
        """TLS-RPT counters live beside the policies, in the queue database."""
        await self._store.count_tls_result(key, policy)

    def update_resolver(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def policy(self, domain: str) -> Policy | None:
        domain = domain.lower().rstrip(".")
        now = self._clock()
        cached = await self._store.sts_policy(domain)
        usable = cached if cached is not None and cached[3] > now else None
        txt = await self._resolver.txt(f"_mta-sts.{domain}")
        policy_id = parse_txt(txt.texts) if isinstance(txt, TxtRecords) else None
        if policy_id is None or (usable is not None and usable[0] == policy_id):
            return _parsed(usable)
        try:
            text = await self._download(domain)
            policy = parse_policy(text)
        except (FetchError, PolicyError) as exc:
            log.warning("MTA-STS policy of %s not refreshed: %s", domain, exc)
            return _parsed(usable)
        await self._store.store_sts_policy(domain, (policy_id, text, now, now + policy.max_age))
        return policy

    async def _download(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        found = await self._resolver.addresses(host)
        if isinstance(found, DnsTempFailure):
            raise FetchError(found.reason)
        if not isinstance(found, Addresses):
            raise FetchError(f"{host} has no address")
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._fetch, host, found.addresses[0]), FETCH_TIMEOUT
            )
        except TimeoutError:
            raise FetchError(f"fetching the policy from {host} timed out") from None


def _parsed(row: tuple[str, str, float, float] | None) -> Policy | None:
    if row is None:
        return None
    try:
        return parse_policy(row[1])
    except PolicyError:
        return None
