"""Mail of this host's users: local recipients to their aliases, senders qualified and masqueraded.

Pure decisions, no I/O, applied on every way in (the SMTP listener, ``deliverd send``, the
maildrop that ``deliverd sendmail`` writes into). An address is local when it has no domain or
its domain is one of ``local.domains``. A local recipient becomes the targets of its alias (or
of ``"*"``), once: targets are never looked up again, so aliases cannot loop (the spec rules
refuse a target in a local domain). A local recipient without an alias is refused, never
dropped. Local senders get ``qualify_domain``, or ``masquerade.domain`` unless excepted, in the
envelope and in ``From:``/``Sender:`` (Postfix masquerade_domains); recipient headers only get
qualified, so a cron mail's ``To: root`` leaves the host as ``To: root@host.name``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import formataddr, getaddresses
from functools import cache

from deliverd.config.model import LocalConfig, MasqueradeConfig
from deliverd.submission import local_addresses as rules
from deliverd.submission.local_addresses import ANY_USER, UnknownLocalUser, domain_key
from deliverd.submission.message_input import split_fields

__all__ = ["ANY_USER", "LocalPolicy", "UnknownLocalUser", "header_addresses", "local_policy",
           "split_fields"]

# Header fields whose addresses are senders (masqueraded) or recipients (only qualified).
_SENDER_FIELDS = frozenset({"from", "sender"})
_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc"})
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class LocalPolicy:
    domains: frozenset[str]
    qualify_domain: str
    aliases: dict[str, tuple[str, ...]]
    masquerade_domain: str | None
    except_users: frozenset[str]

    # -- addresses ------------------------------------------------------------------------------

    def local_user(self, address: str) -> str | None:
        """The user an address names on this host, or None for any other address."""
        return rules.local_user(address, self.domains)

    def qualify(self, address: str) -> str:
        """``root`` → ``root@qualify_domain``; qualified addresses and '' are left alone."""
        return rules.qualify(address, self.qualify_domain)

    def resolve_recipient(self, address: str) -> tuple[str, ...]:
        """The addresses that receive mail for ``address`` (itself unless it is local)."""
        return rules.resolve_recipient(address, self.domains, self.qualify_domain, self.aliases)

    def resolve_recipients(self, addresses: Iterable[str]) -> list[str]:
        """Every recipient resolved, in order, each target once. Raises ``UnknownLocalUser``
        for the first local recipient without an alias."""
        return rules.resolve_recipients(addresses, self.domains, self.qualify_domain,
                                        self.aliases)

    def sender(self, address: str) -> str:
        """The envelope sender as it leaves: qualified, and masqueraded for local users."""
        return rules.sender(address, self.domains, self.qualify_domain, self.masquerade_domain,
                            self.except_users)

    # -- headers --------------------------------------------------------------------------------

    def rewrite_headers(self, header: bytes) -> bytes:
        """The header section with sender fields masqueraded and recipient fields qualified.

        ``header`` is everything before the empty line (CRLF or LF endings); a field that
        needs no change keeps its exact bytes.
        """
        fields = split_fields(header)
        changed = False
        out: list[bytes] = []
        for raw in fields:
            new = self._rewrite_field(raw)
            changed = changed or new is not raw
            out.append(new)
        return b"".join(out) if changed else header

    def rewrite_message(self, data: bytes) -> bytes:
        """The message with its header section rewritten (the body is not touched)."""
        end = _HEADER_END.search(data)
        if data.startswith((b"\r\n", b"\n")):
            return data
        cut = len(data) if end is None else end.start() + (2 if data[end.start()] == 13 else 1)
        header = data[:cut]
        new = self.rewrite_headers(header)
        return data if new is header else new + data[cut:]

    def _rewrite_field(self, raw: bytes) -> bytes:
        match = _FIELD.match(raw)
        if match is None:
            return raw
        name = match.group(1).decode("ascii").lower()
        if name in _SENDER_FIELDS:
            rewrite = self.sender
        elif name in _RECIPIENT_FIELDS:
            rewrite = self.qualify
        else:
            return raw
        value = raw[match.end():].decode("utf-8", "surrogateescape")
        if ";" in value:  # group syntax ("undisclosed-recipients:;"): left as written
            return raw
        pairs = getaddresses([value.replace("\r\n", "").replace("\n", "")])
        rewritten = [(n, rewrite(a)) for n, a in pairs]
        if rewritten == pairs or any(not a for _, a in pairs):
            return raw
        ending = b"\r\n" if raw.endswith(b"\r\n") else b"\n"
        text = ", ".join(formataddr(pair) for pair in rewritten)
        return (
            raw[: match.end()] + b" " + text.encode("utf-8", "surrogateescape") + ending
        )


@cache
def local_policy(local: LocalConfig, masquerade: MasqueradeConfig) -> LocalPolicy:
    """The policy of a config (cached: the listener asks for it on every message)."""
    return LocalPolicy(
        domains=frozenset(domain_key(d) for d in local.domains),
        qualify_domain=local.qualify_domain,
        aliases={user.lower(): targets for user, targets in local.aliases},
        masquerade_domain=masquerade.domain,
        except_users=frozenset(u.lower() for u in masquerade.except_users),
    )


def header_addresses(header: bytes, names: Sequence[str]) -> list[str]:
    """Addresses in the named header fields (``-t``: To, Cc, Bcc), in order."""
    wanted = {n.lower() for n in names}
    values = []
    for raw in split_fields(header):
        match = _FIELD.match(raw)
        if match is not None and match.group(1).decode("ascii").lower() in wanted:
            value = raw[match.end():].decode("utf-8", "surrogateescape")
            values.append(value.replace("\r\n", "").replace("\n", ""))
    return [address for _, address in getaddresses(values) if address]
