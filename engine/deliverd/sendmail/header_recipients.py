"""``-t``: the addresses of To:, Cc: and Bcc:.

Written plainly (``a@b``, ``Name <a@b>``, lists of those) they are read here, as the email
package's parser reads them; anything else (quotes, comments, groups, non-ASCII) is read by
that parser (``deliverd.submission.local.header_addresses``), imported only then: it costs a
``sendmail`` run more than the rest of it.
"""

from __future__ import annotations

from deliverd.submission.message_input import split_fields

_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+/=?^_`{|}~-.")
_TO_FIELDS = ("to", "cc", "bcc")


def header_recipients(header: bytes) -> list[str]:
    """The addresses of To:, Cc: and Bcc:, in order."""
    found = plain_addresses(header)
    if found is None:
        from deliverd.submission.local import header_addresses

        found = header_addresses(header, _TO_FIELDS)
    return found


def plain_addresses(header: bytes) -> list[str] | None:
    """The addresses of To:, Cc: and Bcc: when they are written plainly; None for anything
    else."""
    found: list[str] = []
    for raw in split_fields(header):
        name, _, rest = raw.partition(b":")
        if name.decode("ascii").lower() not in _TO_FIELDS:
            continue
        value = rest.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
        if not value.isascii() or any(c in '"()\\;:[]' for c in value):
            return None
        for part in value.split(","):
            address = _address(part.strip(" \t"))
            if address is None:
                return None
            if address:
                found.append(address)
    return found


def _address(part: str) -> str | None:
    """The address of one list item ('' for an empty one), None when it is not plain."""
    if "<" in part or ">" in part:
        phrase, _, rest = part.partition("<")
        address, closed, tail = rest.partition(">")
        address = address.strip(" \t")
        if not closed or tail or "<" in rest or ">" in phrase or "@" in phrase or not address:
            return None
    else:
        address = part
    if not address:
        return ""
    local, at, domain = address.partition("@")
    if (any(c not in _ATEXT for c in local + domain) or not local
            or (at and not domain) or "@" in domain):
        return None
    return address
