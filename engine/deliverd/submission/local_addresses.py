"""Addresses of this host's users: which are local, qualified, aliased and masqueraded.

The rules of ``local.*`` and ``masquerade.*`` on one address, as plain functions:
``deliverd.submission.local.LocalPolicy`` applies them on every way in, and ``sendmail``
(``deliverd.sendmail``) applies the same ones through ``LocalRules`` without importing the
config model. Pure, and no imports at all: this module is on every ``sendmail`` run's import
path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence, Set

ANY_USER = "*"


class UnknownLocalUser(Exception):
    """A local recipient that has no alias: the message is refused for it."""

    def __init__(self, address: str, user: str) -> None:
        self.address = address
        self.user = user
        super().__init__(
            f"<{address}>: local user {user!r} has no alias; deliverd delivers nothing on "
            f"this host, set local.aliases.{user} (or local.aliases.\"*\") in the delivery spec"
        )

    @property
    def smtp_reply(self) -> str:
        return f"550 5.1.1 {self}"


def domain_key(domain: str) -> str:
    return domain.lower().rstrip(".")


def local_user(address: str, domains: Set[str]) -> str | None:
    """The user an address names on this host, or None for any other address.

    ``domains`` are ``local.domains`` as ``domain_key`` spells them."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address or None
    return local if domain_key(domain) in domains and local else None


def qualify(address: str, qualify_domain: str) -> str:
    """``root`` → ``root@qualify_domain``; qualified addresses and '' are left alone."""
    if not address or "@" in address or not qualify_domain:
        return address
    return f"{address}@{qualify_domain}"


def resolve_recipient(address: str, domains: Set[str], qualify_domain: str,
                      aliases: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The addresses that receive mail for ``address`` (itself unless it is local).

    ``aliases`` are keyed by the lower-cased user; raises ``UnknownLocalUser``."""
    user = local_user(address, domains)
    if user is None:
        return (address,)
    targets = aliases.get(user.lower()) or aliases.get(ANY_USER)
    if not targets:
        raise UnknownLocalUser(qualify(address, qualify_domain), user)
    return targets


def sender(address: str, domains: Set[str], qualify_domain: str,
           masquerade_domain: str | None, except_users: Set[str]) -> str:
    """The envelope sender as it leaves: qualified, and masqueraded for local users.

    ``except_users`` are lower-cased."""
    user = local_user(address, domains)
    if user is None:
        return address
    if masquerade_domain and user.lower() not in except_users:
        return f"{user}@{masquerade_domain}"
    return qualify(address, qualify_domain)


def resolve_recipients(addresses: Iterable[str], domains: Set[str], qualify_domain: str,
                       aliases: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every recipient resolved, in order, each target once. Raises ``UnknownLocalUser`` for
    the first local recipient without an alias."""
    out: list[str] = []
    seen: set[str] = set()
    for address in addresses:
        for target in resolve_recipient(address, domains, qualify_domain, aliases):
            if target.lower() not in seen:
                seen.add(target.lower())
                out.append(target)
    return out


class LocalRules:
    """The rules of ``local.*`` and ``masquerade.*`` as the config writes them (``LocalPolicy``
    without the config model and the header rewriting, which the pickup does)."""

    def __init__(self, domains: Iterable[str], qualify_domain: str,
                 aliases: Mapping[str, Sequence[str]], masquerade_domain: str | None,
                 except_users: Iterable[str]) -> None:
        self.domains = frozenset(domain_key(d) for d in domains)
        self.qualify_domain = qualify_domain
        self.aliases = {user.lower(): tuple(targets) for user, targets in aliases.items()}
        self.masquerade_domain = masquerade_domain
        self.except_users = frozenset(u.lower() for u in except_users)

    def resolve_recipient(self, address: str) -> tuple[str, ...]:
        return resolve_recipient(address, self.domains, self.qualify_domain, self.aliases)

    def resolve_recipients(self, addresses: Iterable[str]) -> list[str]:
        return resolve_recipients(addresses, self.domains, self.qualify_domain, self.aliases)

    def sender(self, address: str) -> str:
        return sender(address, self.domains, self.qualify_domain, self.masquerade_domain,
                      self.except_users)
