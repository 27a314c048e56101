"""Does the DNS publish each key the way verifiers need it? Pure: the caller looks the record up.

``check_key(key, published)`` compares the TXT record found at ``selector._domainkey.domain``
with the key: present, ``v=DKIM1``, the same ``k=`` and ``p=`` (the public half of the key on
this host), and a test message signed with the key verifies against that very record with
dkimpy's verifier. Every problem is said in words an operator can act on.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from deliverd.dkim.keys import RSA, SigningKey
from deliverd.dkim.signer import Signer

_TEST_MESSAGE = (
    "From: dkim-check@{domain}\r\nTo: dkim-check@{domain}\r\nSubject: deliverd dkim check\r\n"
    "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <dkim-check@{domain}>\r\n\r\n"
    "A test signature, never sent.\r\n"
)


@dataclass(frozen=True)
class KeyCheck:
    name: str
    selector: str
    domain: str
    algorithm: str
    problems: tuple[str, ...] = field(default=())
    published: str | None = None  # the record's text as DNS returned it, None when absent

    @property
    def ok(self) -> bool:
        return not self.problems


def tags(record: str) -> dict[str, str]:
    """``v=DKIM1; k=rsa; p=...`` as a dict (RFC 6376 3.2 tag=value list; whitespace dropped)."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out[name.strip()] = "".join(value.split())
    return out


def check_key(key: SigningKey, published: str | None) -> KeyCheck:
    entry = key.entry
    problems = list(_record_problems(key, published))
    if published is not None and not problems:
        problems += _signature_problems(key, published)
    return KeyCheck(key.record_name, entry.selector, entry.domain, entry.algorithm,
                    tuple(problems), published)


def _record_problems(key: SigningKey, published: str | None) -> list[str]:
    if published is None:
        return [f"no TXT record at {key.record_name}: publish {key.txt_value()!r}"]
    found = tags(published)
    problems = []
    if found.get("v", "DKIM1") != "DKIM1":
        problems.append(f"v={found['v']}, not DKIM1")
    kind = "rsa" if key.entry.algorithm == RSA else "ed25519"
    if found.get("k", "rsa") != kind:
        problems.append(f"k={found.get('k', 'rsa')} in DNS, but the key is {kind}")
    if not found.get("p"):
        problems.append("p= is empty: the record says this key is revoked")
        return problems
    try:
        public = base64.b64decode(found["p"], validate=True)
    except (binascii.Error, ValueError):
        return [*problems, "p= is not base64"]
    if public != key.public:
        problems.append(f"p= in DNS is not the public half of {key.entry.key_file}: the "
                        "record is for another key (publish the new one before switching)")
    return problems


def _signature_problems(key: SigningKey, published: str) -> list[str]:
    import dkim

    domain = key.entry.domain.rstrip(".")
    message = _TEST_MESSAGE.format(domain=domain).encode("ascii")
    signed = Signer((key,)).signatures(message) + message

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return published.encode("ascii", "replace")

    try:
        ok = bool(dkim.DKIM(signed).verify(dnsfunc=dnsfunc))
    except dkim.DKIMException as exc:
        return [f"a test signature does not verify: {exc}"]
    return [] if ok else ["a test signature does not verify against the published record"]
