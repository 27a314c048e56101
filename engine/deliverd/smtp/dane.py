"""DANE for SMTP (RFC 7672): does a server's certificate chain match its TLSA records?

Pure decisions, no I/O: the resolver finds the records (only DNSSEC-validated ones count), the
transport hands over the certificates the server sent, this module says yes or no and why.

Supported, as RFC 7672 asks of SMTP clients:
- DANE-EE(3): the leaf's full certificate (selector 0) or SubjectPublicKeyInfo (selector 1),
  exact (matching 0), SHA2-256 (1) or SHA2-512 (2). Names and validity dates are ignored
  (RFC 7672 §3.1.1).
- DANE-TA(2): a certificate the server sent above its leaf (or, when the record holds the full
  certificate or key, a trust anchor given in DNS itself) matches the record; the chain from
  the leaf up to it must be correctly signed and in date, and the leaf must name the MX host.
  The chain beyond the leaf comes from OpenSSL's unverified peer chain (``get_unverified_chain``,
  public from Python 3.13, present privately from 3.10); without it only DANE-TA records holding
  the full anchor (matching type 0) can be checked.
- PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (RFC 7672 §3.1.3) and so are unknown
  selectors and matching types: when every record is unusable the connection is encrypted
  without authentication (RFC 7672 §2.2).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

DANE_TA = 2
DANE_EE = 3
SELECTOR_CERT = 0
SELECTOR_SPKI = 1
MATCH_FULL = 0
MATCH_SHA256 = 1
MATCH_SHA512 = 2


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: usage, selector, matching type and the association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in (SELECTOR_CERT, SELECTOR_SPKI)
            and self.mtype in (MATCH_FULL, MATCH_SHA256, MATCH_SHA512)
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


@dataclass(frozen=True)
class DaneResult:
    ok: bool
    reason: str


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    return tuple(r for r in records if r.usable)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == SELECTOR_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == MATCH_SHA256:
        return hashlib.sha256(data).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(data).digest()
    return data


def matches(record: Tlsa, cert: x509.Certificate) -> bool:
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 DNS-ID match: exact, or ``*.`` standing for exactly one left-most label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


def _in_date(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _anchor_from_record(record: Tlsa) -> x509.Certificate | None:
    if record.selector == SELECTOR_CERT and record.mtype == MATCH_FULL:
        try:
            return x509.load_der_x509_certificate(record.data)
        except ValueError:
            return None
    return None


def _ta_chain_ok(
    chain: Sequence[x509.Certificate], anchor_index: int, now: datetime.datetime
) -> bool:
    """Every certificate from the leaf up to the anchor is signed by the next and in date."""
    for child, issuer in itertools.pairwise(chain[: anchor_index + 1]):
        if not _signed_by(child, issuer):
            return False
    return all(_in_date(c, now) for c in chain[:anchor_index])


def _check_ta(
    records: Sequence[Tlsa],
    chain: Sequence[x509.Certificate],
    names: Sequence[str],
    now: datetime.datetime,
) -> DaneResult | None:
    leaf = chain[0]
    if not any(name_matches(p, n) for p in cert_names(leaf) for n in names):
        return None
    for record in records:
        for index in range(1, len(chain)):
            if matches(record, chain[index]) and _ta_chain_ok(chain, index, now):
                return DaneResult(True, f"DANE-TA record {record} matches the issuer chain")
        anchor = _anchor_from_record(record)
        if anchor is not None and _ta_chain_ok([*chain, anchor], len(chain), now):
            return DaneResult(True, f"DANE-TA record {record} signs the chain")
    return None


def verify(
    records: Sequence[Tlsa],
    chain_der: Sequence[bytes],
    names: Sequence[str],
    *,
    now: datetime.datetime | None = None,
) -> DaneResult:
    """Whether the peer chain (leaf first, DER) matches one usable record.

    ``names`` are the reference identifiers for DANE-TA (the MX host name, RFC 7672 §3.2.2).
    """
    if not chain_der:
        return DaneResult(False, "DANE: the server sent no certificate")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return DaneResult(False, "DANE: the server's certificate cannot be parsed")
    when = now or datetime.datetime.now(datetime.UTC)
    usable_records = usable(records)
    for record in usable_records:
        if record.usage == DANE_EE and matches(record, chain[0]):
            return DaneResult(True, f"DANE-EE record {record} matches")
    ta_records = [r for r in usable_records if r.usage == DANE_TA]
    if ta_records:
        found = _check_ta(ta_records, chain, names, when)
        if found is not None:
            return found
    listed = ", ".join(str(r) for r in usable_records)
    return DaneResult(False, f"DANE: certificate matches no TLSA record ({listed})")
