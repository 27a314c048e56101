"""The ``x-format`` checks that need code: IP addresses, networks, nameservers, control characters.

A JSON Schema pattern can say "hex digits, dots and colons" but not "a valid IPv6 address", so
these fields are checked once the schema accepted them, with messages that say what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from deliverd.spec.problems import (
    Problem,
    Taint,
    pointer,
    show,
)
from deliverd.spec.schema_fields import (
    walk,
)

_INDEX = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_ip(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return f"{show(text)} is not an IP address"
    return None


def _check_cidr(text: str) -> str | None:
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"{show(text)} is not a network in CIDR form"
        return f"{show(text)} has host bits set: the network is {network}"
    return None


def _check_nameserver(text: str) -> str | None:
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, None
    if _check_ip(address) is not None:
        return f"{show(text)} is not an IP address, or ip:port"
    if port is not None and not (_INDEX.fullmatch(port) and 1 <= int(port) <= 65535):
        return f"{show(text)} has a port outside 1..65535"
    return None


def _check_listen_address(text: str) -> str | None:
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        port = rest[1:]
    else:
        address, _, port = text.rpartition(":")
    if _check_ip(address) is not None:
        return f"{show(text)} is not an IP address and port"
    if not (_INDEX.fullmatch(port) and 1 <= int(port) <= 65535):
        return f"{show(text)} has a port outside 1..65535"
    return None


def _check_host_or_ip(text: str) -> str | None:
    # The pattern admits anything made of hex digits, dots and colons: "cafe.de:25" included.
    if ":" in text and _check_ip(text) is not None:
        return f"{show(text)} is not an IPv6 address (write the port in 'port')"
    if re.fullmatch(r"[0-9.]+", text) and _check_ip(text) is not None:
        return f"{show(text)} is not an IPv4 address"
    return None


_FORMATS: dict[str, Callable[[str], str | None]] = {
    "ip": _check_ip,
    "cidr": _check_cidr,
    "nameserver": _check_nameserver,
    "listen_address": _check_listen_address,
    "host_or_ip": _check_host_or_ip,
}


def format_problems(spec: object, bad: Taint) -> list[Problem]:
    problems = []
    for node in walk(spec):
        if not isinstance(node.value, str) or node.schema is None or bad.touches(node.path):
            continue
        hint = str(node.schema.get("x-hint", ""))
        if not node.secret and _CONTROL.search(node.value):
            problems.append(
                Problem(
                    pointer(*node.path),
                    "contains a line break or another control character",
                    "write it on one line; YAML block scalars (| and >) add a line break",
                )
            )
            continue
        check = _FORMATS.get(str(node.schema.get("x-format")))
        message = check(node.value) if check is not None else None
        if message is not None:
            problems.append(Problem(pointer(*node.path), message, hint))
    return problems
