"""Signing a message once, when it is queued, with every key of its ``From:`` domain.

``signer_for(cfg.dkim)`` is what every way in calls: None (and no work at all) when the config
has no keys; otherwise a ``Signer`` holding the keys, loaded once and loaded again only when a
key file changes on disk (a stat per file and message). A key file that cannot be read raises
``DkimKeyError``: the caller refuses the message for now (4xx) rather than send it unsigned.

``Signer.signatures(message)`` returns the ``DKIM-Signature:`` fields to put on top of the
message (empty when no key's domain is the ``From:`` domain or a parent of it), relaxed/relaxed,
with From, To, Subject, Date and Message-ID listed once more in ``h=`` than they occur, so that
no copy of them can be added after signing. Trace fields are never signed, so the ``Received:``
the listener puts above the signature leaves it valid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from deliverd.config.model import DkimKey
from deliverd.dkim.keys import DkimKeyError, SigningKey, load_key

OVERSIGNED = ("from", "to", "subject", "date", "message-id")
_CANONICALISATION = (b"relaxed", b"relaxed")
_CACHE_SIZE = 4


@dataclass(frozen=True)
class Signer:
    keys: tuple[SigningKey, ...]

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys that sign mail from ``domain``: its own domain's and its parents'."""
        domain = domain.lower().rstrip(".")
        return [k for k in self.keys if _within(domain, k.entry.domain.lower().rstrip("."))]

    def signatures(self, message: bytes) -> bytes:
        """``DKIM-Signature:`` fields (CRLF-terminated) for ``message``, b"" when none apply."""
        domain = from_domain(message)
        if domain is None:
            return b""
        keys = self.keys_for(domain)
        if not keys:
            return b""
        import dkim

        out = []
        for key in keys:
            out.append(dkim.sign(
                message,
                key.entry.selector.encode("ascii"),
                key.entry.domain.rstrip(".").encode("ascii"),
                key.private,
                canonicalize=_CANONICALISATION,
                signature_algorithm=key.entry.algorithm.encode("ascii"),
                include_headers=signed_headers(key.entry.headers),
                linesep=b"\r\n",
            ))
        return b"".join(out)


def signed_headers(headers: Sequence[str]) -> list[bytes]:
    """The ``h=`` list: the configured fields, then the oversigned ones among them again."""
    names = [h.lower().encode("ascii") for h in headers]
    return names + [n for n in names if n.decode("ascii") in OVERSIGNED]


def _within(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def from_domain(message: bytes) -> str | None:
    """The domain of the single address of the single ``From:`` field, else None."""
    values = []
    field: bytes | None = None
    for line in _header_lines(message):
        if line[:1] in (b" ", b"\t"):
            if field is not None:
                field += line
            continue
        if field is not None:
            values.append(field)
        field = line[5:] if line[:5].lower() == b"from:" else None
    if field is not None:
        values.append(field)
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "surrogateescape").replace("\r", "").replace("\n", "")
    addresses = [a for _, a in getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2] or None


def _header_lines(message: bytes) -> list[bytes]:
    lines = []
    for line in message.split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            break
        lines.append(line)
    return lines


_cache: dict[tuple[tuple[DkimKey, ...], tuple[tuple[int, int, int], ...]], Signer] = {}


def signer_for(entries: tuple[DkimKey, ...]) -> Signer | None:
    """The signer of a config's ``dkim[]``; None when it has none. ``DkimKeyError`` when a key
    file cannot be read or parsed."""
    if not entries:
        return None
    stamp = tuple(_stamp(entry.key_file) for entry in entries)
    found = _cache.get((entries, stamp))
    if found is None:
        found = Signer(tuple(load_key(entry) for entry in entries))
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[(entries, stamp)] = found
    return found


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DkimKeyError(f"DKIM key {path}: cannot be read ({exc.strerror or exc})") from None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def signed(entries: tuple[DkimKey, ...], message: bytes) -> bytes:
    """``message`` with its signatures on top (itself when none apply). ``DkimKeyError`` when
    a key cannot be read: the message must then not be queued."""
    signer = signer_for(entries)
    if signer is None:
        return message
    return signer.signatures(message) + message
