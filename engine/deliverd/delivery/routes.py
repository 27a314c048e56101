"""Which route a recipient of a message takes: the first ``routes[]`` entry that matches.

Pure. A route matches when every field its ``match`` sets matches: the envelope sender is one
of ``sender`` (case-insensitive), the sender's domain is one of ``sender_domain``, the
recipient's domain is one of ``recipient_domain``. A domain value is exact, or with a leading
dot every domain below it (``.example.com`` takes ``mail.example.com``, not ``example.com``),
like Postfix's ``.domain`` lookups. The null sender (bounces) matches no sender condition.
No route matching means the default: ``routing``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from deliverd.config.model import RouteConfig, RouteMatch, RoutingMode
from deliverd.delivery.router import group_by_domain


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def domain_matches(patterns: Sequence[str], domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith(".") and domain.endswith(pattern):
            return True
        if pattern == domain:
            return True
    return False


def matches(match: RouteMatch, sender: str, recipient: str) -> bool:
    if match.sender and (
        not sender or sender.lower() not in (s.lower() for s in match.sender)
    ):
        return False
    if match.sender_domain and (
        not sender or not domain_matches(match.sender_domain, _domain(sender))
    ):
        return False
    return not match.recipient_domain or domain_matches(match.recipient_domain,
                                                        _domain(recipient))


def select_route(routes: Iterable[RouteConfig], sender: str, recipient: str
                 ) -> RouteConfig | None:
    """The first route whose match takes this sender and recipient, or None (``routing``)."""
    return next((r for r in routes if matches(r.match, sender, recipient)), None)


def split_by_route(
    routes: Sequence[RouteConfig], default_mode: RoutingMode, sender: str,
    recipients: Iterable[str],
) -> dict[tuple[str | None, str], list[str]]:
    """Recipients grouped into attempts: by route (None for ``routing``) and, unless the
    route sends everything to its smart host, by destination domain."""
    by_route: dict[str | None, list[str]] = {}
    modes: dict[str | None, RoutingMode] = {None: default_mode}
    for recipient in recipients:
        route = select_route(routes, sender, recipient) if routes else None
        name = route.name if route is not None else None
        if route is not None:
            modes[name] = route.mode
        by_route.setdefault(name, []).append(recipient)
    groups: dict[tuple[str | None, str], list[str]] = {}
    for name, rcpts in by_route.items():
        if modes[name] is RoutingMode.SMARTHOST:
            groups[(name, "")] = rcpts
        else:
            for domain, some in group_by_domain(rcpts).items():
                groups[(name, domain)] = some
    return groups
