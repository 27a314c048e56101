"""The semantic rules of ``dkim[]``: one key per domain and selector, and a sane ``h=`` list.

Two entries with the same domain and selector would publish two keys at one DNS name, so
verifiers could check only one of them. The signed header list must hold From (RFC 6376
5.4) and no trace field: ``Received:`` and ``Return-Path:`` are added after signing, on this
host and on the way, and signing them would break every signature.
"""

from __future__ import annotations

from collections.abc import Iterator

from deliverd.spec.problems import Problem, show
from deliverd.spec.view import View, error

_TRACE_FIELDS = frozenset({"received", "return-path", "dkim-signature"})


def duplicate_dkim_selectors(v: View) -> Iterator[Problem]:
    seen: dict[tuple[str, str], int] = {}
    for index in range(v.length("dkim")):
        domain, selector = v.maybe("dkim", index, "domain"), v.maybe("dkim", index, "selector")
        if not isinstance(domain, str) or not isinstance(selector, str):
            continue
        key = (domain.lower().rstrip("."), selector.lower())
        if key in seen:
            yield error(
                ("dkim", index, "selector"),
                f"{show(selector)} is already used for {show(domain)} by dkim[{seen[key]}]: "
                "one DNS record cannot publish two keys",
                "give each key of a domain its own selector (e.g. rsa2026 and ed2026)",
            )
        else:
            seen[key] = index


def dkim_headers(v: View) -> Iterator[Problem]:
    for index in range(v.length("dkim")):
        headers = v.maybe("dkim", index, "headers")
        if not isinstance(headers, list):
            continue
        names = [str(h).lower() for h in headers]
        if "from" not in names:
            yield error(("dkim", index, "headers"), "must include From (RFC 6376 5.4)",
                        "add From to the list")
        for position, name in enumerate(names):
            if name in _TRACE_FIELDS:
                yield error(
                    ("dkim", index, "headers", position),
                    f"{show(headers[position])} is added after signing and may not be signed",
                    "remove trace fields (Received, Return-Path, DKIM-Signature) from the list",
                )
