"""The semantic rules of ``routes[]``: names, modes, and routes an earlier one hides.

A route is chosen by its ``match`` (first match wins), so a route whose every possible message
an earlier route already takes can never be used: that is a warning, because the spec still
means something, just not what its author thought. Which messages a match takes is decided by
``covers``, shared with the engine's own route choice in spirit: exact values, or a
``.suffix`` that takes every domain below it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from deliverd.spec.problems import PathParts, Problem, show
from deliverd.spec.view import Skip, View, error, warn

_FIELDS = ("sender", "sender_domain", "recipient_domain")
_NEEDS_SMARTHOST = ("smarthost", "direct_then_smarthost")


def domain_covers(pattern: str, domain: str) -> bool:
    """Whether every domain matched by ``domain`` (a pattern too) is matched by ``pattern``."""
    pattern, domain = pattern.lower().rstrip("."), domain.lower().rstrip(".")
    if pattern.startswith("."):
        return domain.endswith(pattern)  # .example.com covers a.example.com and .a.example.com
    return not domain.startswith(".") and domain == pattern


def _covers_values(field: str, earlier: Sequence[str], later: Sequence[str]) -> bool:
    if field == "sender":
        return all(any(a.lower() == b.lower() for a in earlier) for b in later)
    return all(any(domain_covers(a, b) for a in earlier) for b in later)


def covers(earlier: dict[str, list[str]], later: dict[str, list[str]]) -> bool:
    """Whether every message ``later`` matches is matched by ``earlier`` too.

    Each field of ``earlier`` must be implied by ``later``: the same field with values all
    covered, or (for ``sender_domain``) ``later``'s sender addresses all in covered domains.
    """
    for field, values in earlier.items():
        theirs = later.get(field)
        if theirs is not None and _covers_values(field, values, theirs):
            continue
        senders = later.get("sender")
        if field == "sender_domain" and senders is not None and all(
            any(domain_covers(v, s.rpartition("@")[2]) for v in values) for s in senders
        ):
            continue
        return False
    return True


def _match(v: View, index: int) -> dict[str, list[str]] | None:
    found: dict[str, list[str]] = {}
    for field in _FIELDS:
        values = v.get("routes", index, "match", field)
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(x, str) for x in values):
            return None
        found[field] = values
    return found or None


def _route_paths(v: View) -> Iterator[tuple[int, PathParts]]:
    for index in range(v.length("routes")):
        yield index, ("routes", index)


def duplicate_route_names(v: View) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for index, path in _route_paths(v):
        name = v.maybe(*path, "name")
        if not isinstance(name, str):
            continue
        if name in seen:
            yield error(
                (*path, "name"),
                f"{show(name)} repeats routes[{seen[name]}].name",
                "give every route its own name: logs, metrics and secrets are keyed by it",
            )
        else:
            seen[name] = index


def route_modes(v: View) -> Iterator[Problem]:
    for _index, path in _route_paths(v):
        try:
            has_smarthost = v.present(*path, "smarthost")
            mode = v.get(*path, "mode")
        except Skip:
            continue
        if mode in _NEEDS_SMARTHOST and not has_smarthost:
            yield error(
                (*path, "smarthost"),
                f"is required when the route's mode is {mode}",
                "add the route's smart host, e.g. smarthost: {host: relay.example.com, "
                "port: 587}, or set mode: direct",
            )
        elif mode == "direct" and has_smarthost:
            yield warn(
                (*path, "smarthost"),
                "is ignored: the route's mode is direct",
                "set the route's mode to smarthost or direct_then_smarthost, or remove its "
                "smart host",
            )


def shadowed_routes(v: View) -> Iterator[Problem]:
    matches: list[tuple[int, dict[str, list[str]]]] = []
    for index, path in _route_paths(v):
        try:
            match = _match(v, index)
        except Skip:
            continue
        if match is None:
            continue
        hider = next((i for i, earlier in matches if covers(earlier, match)), None)
        if hider is not None:
            yield warn(
                (*path, "match"),
                f"can never be used: routes[{hider}] matches every message it would",
                f"move this route before routes[{hider}], or narrow routes[{hider}].match",
            )
        matches.append((index, match))
