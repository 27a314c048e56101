"""DNS lookups for delivery: MX and address records as small typed results, never exceptions.

The planner (``deliverd.delivery.router``) decides what a result means; this module only asks
DNS and says what came back. Every dnspython (and socket) error is translated in ``_ask``, in one
place, so a hostile or odd answer (bad targets, empty answers, truncation that TCP cannot repair,
SERVFAIL, REFUSED, silence) becomes a ``DnsTempFailure`` or a sensible result, never an
exception out of ``mx()`` or ``addresses()``.

Answers are cached per (name, type) for their TTL, negative answers for the SOA minimum (or
``NEGATIVE_TTL`` when the server sends no SOA), both capped at ``MAX_TTL``. Temporary failures
are not cached: the next attempt asks again.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

MAX_TTL = 3600
NEGATIVE_TTL = 60
MAX_CACHE_ENTRIES = 50_000


@dataclass(frozen=True)
class MxHosts:
    """MX records as published: (preference, host). Ordering is the planner's policy."""

    records: tuple[tuple[int, str], ...]
    secure: bool = False  # the answer came with the AD bit (DNSSEC-validated)


@dataclass(frozen=True)
class NullMx:
    """RFC 7505: the domain declares that it accepts no mail."""


@dataclass(frozen=True)
class NoMx:
    """The name exists but has no MX records (RFC 5321 implicit MX applies)."""

    secure: bool = False  # the absence was DNSSEC-validated (DANE for the implicit MX)


@dataclass(frozen=True)
class NxDomain:
    """The name does not exist (or cannot be a DNS name at all)."""


@dataclass(frozen=True)
class Addresses:
    """IPv4 addresses first, then IPv6, each in answer order, without duplicates."""

    addresses: tuple[str, ...]
    secure: bool = False  # every answer that gave an address was DNSSEC-validated


@dataclass(frozen=True)
class NoAddresses:
    """The name exists but has neither A nor AAAA records."""


@dataclass(frozen=True)
class DnsTempFailure:
    """Timeout, SERVFAIL, REFUSED, no nameserver answering: worth asking again later."""

    reason: str


@dataclass(frozen=True)
class TlsaRecords:
    """DNSSEC-validated TLSA records: (usage, selector, matching type, data)."""

    records: tuple[tuple[int, int, int, bytes], ...]


@dataclass(frozen=True)
class NoTlsa:
    """No TLSA records, or only records without DNSSEC validation (RFC 7672: as if none)."""

    secure: bool  # True: the absence itself was validated


@dataclass(frozen=True)
class TxtRecords:
    """TXT records, each one's strings joined (RFC 7208 §3.3 style), possibly none."""

    texts: tuple[str, ...]


MxResult = MxHosts | NullMx | NoMx | NxDomain | DnsTempFailure
AddressResult = Addresses | NoAddresses | NxDomain | DnsTempFailure
TlsaResult = TlsaRecords | NoTlsa | DnsTempFailure
TxtResult = TxtRecords | DnsTempFailure


def ascii_domain(domain: str) -> str:
    """The lowercased A-label (IDNA) form of ``domain``, without a trailing dot.

    dnspython's codec (IDNA 2008 when the ``idna`` package is present) comes first; names it
    rejects but that IDNA 2003 accepts (some legacy symbols) fall back to Python's ``idna``
    codec. A name neither accepts is returned lowercased: DNS will then say it does not exist.
    """
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        return name.lower()
    try:
        return dns.name.from_text(name).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        pass
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return name.lower()


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> str | None:
    """The address when ``host`` is an IP literal (``1.2.3.4``, ``::1``, ``[IPv6:::1]``).
    Cached: every attempt asks it of its smart host or MX names."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    """``ip``, ``ip:port``, ``v6`` or ``[v6]:port`` as a dnspython nameserver."""
    text = spec.strip()
    port = 53
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {spec!r}: expected [address]:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        address = text
    ipaddress.ip_address(address)  # a name here would need DNS to find DNS
    if not 0 < port < 65536:
        raise ValueError(f"nameserver {spec!r}: port out of range")
    return dns.nameserver.Do53Nameserver(address, port)


# What one DNS question produced, before the MX/address meaning is given to it.
@dataclass(frozen=True)
class _Records:
    rrset: dns.rrset.RRset | None  # None: the name exists, no records of that type
    ttl: int
    secure: bool = False


@dataclass(frozen=True)
class _NoName:
    ttl: int
    secure: bool = False


_Asked = _Records | _NoName | DnsTempFailure


class Resolver:
    """MX and address lookups with a TTL cache; see the module docstring for the contract."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 10.0,
        cache: bool = True,
        *,
        dnssec: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [parse_nameserver(ns) for ns in nameservers]
        else:
            try:
                self._dns = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException:
                # No usable system configuration: every lookup is a temporary failure (the
                # operator can fix resolv.conf) rather than a crash at startup.
                self._dns = dns.asyncresolver.Resolver(configure=False)
                self._dns.nameservers = []
        if dnssec:
            # A validating resolver sets AD only when the query asks for it (RFC 6840 §5.7).
            self._dns.flags = dns.flags.RD | dns.flags.AD
        self._dns.lifetime = timeout
        self._dns.timeout = timeout
        self._cache_enabled = cache
        self._cache: dict[tuple[str, dns.rdatatype.RdataType], tuple[float, _Asked]] = {}
        self._clock = clock

    async def mx(self, domain: str) -> MxResult:
        asked = await self._lookup(domain, dns.rdatatype.MX)
        if isinstance(asked, _NoName):
            return NxDomain()
        if isinstance(asked, DnsTempFailure):
            return asked
        if asked.rrset is None or len(asked.rrset) == 0:
            return NoMx(asked.secure)
        return _mx_from_records(domain, asked.rrset, asked.secure)

    async def addresses(self, host: str) -> AddressResult:
        literal = ip_literal(host)
        if literal is not None:
            return Addresses((literal,))
        v4, v6 = await asyncio.gather(
            self._lookup(host, dns.rdatatype.A), self._lookup(host, dns.rdatatype.AAAA)
        )
        return _combine_addresses(host, v4, v6)

    async def tlsa(self, host: str, port: int = 25) -> TlsaResult:
        """TLSA records at ``_<port>._tcp.<host>`` (RFC 7672 §2.2), counted only if validated."""
        asked = await self._lookup(f"_{port}._tcp.{ascii_domain(host)}", dns.rdatatype.TLSA)
        if isinstance(asked, DnsTempFailure):
            return asked
        if isinstance(asked, _NoName) or asked.rrset is None or len(asked.rrset) == 0:
            return NoTlsa(asked.secure)
        if not asked.secure:
            return NoTlsa(False)
        return TlsaRecords(tuple(
            (int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in asked.rrset
        ))

    async def txt(self, name: str) -> TxtResult:
        """TXT records at ``name``; none when the name or the records do not exist."""
        asked = await self._lookup(name, dns.rdatatype.TXT)
        if isinstance(asked, DnsTempFailure):
            return asked
        if isinstance(asked, _NoName) or asked.rrset is None:
            return TxtRecords(())
        return TxtRecords(tuple(
            b"".join(r.strings).decode("utf-8", "replace") for r in asked.rrset
        ))

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Asked:
        key = (ascii_domain(name), rdtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        asked = await self._ask(key[0], rdtype)
        if self._cache_enabled and not isinstance(asked, DnsTempFailure) and asked.ttl > 0:
            self._cache.pop(key, None)  # re-inserted last: the dict stays in expiry-ish order
            self._cache[key] = (now + min(asked.ttl, MAX_TTL), asked)
            if len(self._cache) > MAX_CACHE_ENTRIES:
                self._prune(now)
        return asked

    def _prune(self, now: float) -> None:
        """Drop expired entries, then the oldest: a daemon's cache must not grow forever."""
        self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        excess = len(self._cache) - MAX_CACHE_ENTRIES
        for key in list(self._cache)[: max(excess, 0)]:
            del self._cache[key]

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Asked:
        """The one place where dnspython's exceptions become results."""
        label = dns.rdatatype.to_text(rdtype)
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return _NoName(0)  # not a DNS name: no such destination can exist
        if len(qname.labels) < 2:  # "" or ".": the root is no mail destination
            return _NoName(0)
        try:
            answer = await self._dns.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            response = _nxdomain_response(exc)
            return _NoName(_negative_ttl(response), _authenticated(response))
        except dns.resolver.LifetimeTimeout:
            return DnsTempFailure(f"{label} lookup for {name} timed out")
        except dns.resolver.NoNameservers as exc:
            return DnsTempFailure(f"{label} lookup for {name}: no nameserver answered ({exc})")
        except dns.exception.DNSException as exc:
            return DnsTempFailure(f"{label} lookup for {name} failed: {exc}")
        except (OSError, EOFError, ValueError) as exc:
            return DnsTempFailure(f"{label} lookup for {name} failed: {exc!r}")
        secure = _authenticated(answer.response)
        if answer.rrset is None:
            return _Records(None, _negative_ttl(answer.response), secure)
        return _Records(answer.rrset, answer.rrset.ttl, secure)


def _authenticated(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _nxdomain_response(exc: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    responses = exc.kwargs.get("responses") or {}
    for response in responses.values():
        if isinstance(response, dns.message.Message):
            return response
    return None


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: the SOA minimum (bounded by the SOA's own TTL) from the authority section."""
    if response is None:
        return NEGATIVE_TTL
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            return int(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


def _mx_from_records(domain: str, rrset: dns.rrset.RRset, secure: bool) -> MxResult:
    records: list[tuple[int, str]] = []
    null = 0
    unusable: list[str] = []
    for rdata in rrset:
        target = rdata.exchange.to_text(omit_final_dot=True).lower()
        if rdata.exchange == dns.name.root:
            null += 1
        elif ip_literal(target) is not None or target == "":
            # RFC 5321 5.1: an MX target must be a host name; an address there is a
            # misconfiguration we must not follow.
            unusable.append(target)
        else:
            records.append((int(rdata.preference), target))
    if null and not records and not unusable:
        return NullMx()
    if not records:
        return DnsTempFailure(f"MX records of {domain} have no usable target: {unusable}")
    return MxHosts(tuple(records), secure)


def _addresses_of(asked: _Asked) -> list[str]:
    if not isinstance(asked, _Records) or asked.rrset is None:
        return []
    return [str(rdata.address) for rdata in asked.rrset]


def _combine_addresses(host: str, v4: _Asked, v6: _Asked) -> AddressResult:
    found = list(dict.fromkeys(_addresses_of(v4) + _addresses_of(v6)))
    if found:
        answered = [a for a in (v4, v6) if isinstance(a, _Records) and a.rrset is not None]
        return Addresses(tuple(found), all(a.secure for a in answered))
    for asked in (v4, v6):
        if isinstance(asked, DnsTempFailure):
            return asked
    if isinstance(v4, _NoName) or isinstance(v6, _NoName):
        return NxDomain()
    return NoAddresses()
