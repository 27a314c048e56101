"""The semantic rules: what relates one field of a spec to another, beyond the schema.

Each rule reads the spec through a ``_View`` that refuses (``_Skip``) values the schema or the
format checks already rejected, so one mistake is reported once. Credentials need TLS, a
non-loopback listener needs ``allow_networks``, the smart host may not be this host, retry
durations must be ordered, and so on: one small generator per rule, listed in ``_RULES``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from deliverd.core.units import format_duration, parse_duration
from deliverd.spec.problems import (
    PathParts,
    Problem,
    Severity,
    Taint,
    pointer,
    show,
)
from deliverd.spec.schema_fields import (
    field_schema,
)

_SH: PathParts = ("routing", "smarthost")
_POP: PathParts = (*_SH, "pop_before_smtp")


class _Skip(Exception):
    """A rule reads a field the schema already rejected: that mistake is reported once."""


_MISSING = object()


@dataclass(frozen=True)
class _View:
    """Read access for rules: a rejected value raises ``_Skip``, a missing one gives None."""

    spec: Mapping[str, object]
    bad: Taint

    def _lookup(self, path: PathParts) -> object:
        node: object = self.spec
        for part in path:
            if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            elif not isinstance(node, dict) or part not in node:
                return _MISSING
            else:
                node = node[part]
        return node

    def present(self, *path: str | int) -> bool:
        """Whether the field is written (its own content may still be wrong)."""
        if self.bad.touches(path, below=False):
            raise _Skip
        return self._lookup(path) is not _MISSING

    def get(self, *path: str | int) -> object:
        if self.bad.touches(path):
            raise _Skip
        found = self._lookup(path)
        return None if found is _MISSING else found

    def maybe(self, *path: str | int) -> object:
        """Like ``get``, but a rejected value counts as missing (for rules where that is safe)."""
        try:
            return self.get(*path)
        except _Skip:
            return None

    def value(self, *path: str | int) -> object:
        found = self.get(*path)
        if found is None:
            found = (field_schema(path) or {}).get("default")
        return found

    def flag(self, *path: str | int) -> bool:
        return self.value(*path) is True

    def text(self, *path: str | int) -> str | None:
        found = self.value(*path)
        return found if isinstance(found, str) else None

    def number(self, *path: str | int) -> int | None:
        found = self.value(*path)
        return found if isinstance(found, int) and not isinstance(found, bool) else None

    def length(self, *path: str | int) -> int:
        found = self._lookup(path) if not self.bad.touches(path, below=False) else None
        return len(found) if isinstance(found, list) else 0


def _warn(path: PathParts, message: str, hint: str) -> Problem:
    return Problem(pointer(*path), message, hint, Severity.WARNING)


def _error(path: PathParts, message: str, hint: str) -> Problem:
    return Problem(pointer(*path), message, hint)


Rule = Callable[[_View], Iterator[Problem]]


def _smarthost_needed(v: _View) -> Iterator[Problem]:
    mode = v.text("routing", "mode")
    if mode in ("smarthost", "direct_then_smarthost") and not v.present(*_SH):
        yield _error(
            _SH,
            f"is required when routing.mode is {mode}",
            "add the smart host, e.g. smarthost: {host: relay.example.com, port: 587}",
        )


def _smarthost_ignored(v: _View) -> Iterator[Problem]:
    if v.text("routing", "mode") == "direct" and v.present(*_SH):
        yield _warn(
            _SH,
            "is ignored: routing.mode is direct",
            "set routing.mode to smarthost or direct_then_smarthost, or remove the smart host",
        )


def _accounts_with(v: _View, field: str) -> bool:
    return any(v.present("accounts", i, field) for i in range(v.length("accounts")))


def _account_credentials(v: _View) -> bool:
    """Whether some account brings its own smart host password (per-account auth only)."""
    if not v.flag(*_SH, "per_account_auth"):
        return False
    if _accounts_with(v, "smarthost_auth"):
        return True
    return v.flag(*_SH, "use_account_mail_passwords") and _accounts_with(v, "mail_password")


def _smtp_credentials(v: _View) -> bool:
    return v.present(*_SH, "auth") or _account_credentials(v)


def _effective_tls(v: _View) -> str:
    written = v.get(*_SH, "tls")
    if isinstance(written, str):
        return written
    return "starttls" if v.present(*_SH, "auth") else "opportunistic"


def _plaintext_smtp_auth(v: _View) -> Iterator[Problem]:
    if not v.present(*_SH) or not _smtp_credentials(v):
        return
    tls = _effective_tls(v)
    if tls not in ("none", "opportunistic"):
        return
    clear = "" if tls == "none" else " whenever the smart host does not offer STARTTLS"
    setting = f"tls: {tls}" if v.present(*_SH, "tls") else f"the default tls ({tls})"
    if v.flag(*_SH, "allow_plaintext_auth"):
        yield _warn(
            (*_SH, "allow_plaintext_auth"),
            f"smart host passwords may cross the network in clear (tls: {tls})",
            "set tls: starttls (or tls: tls on port 465) and drop allow_plaintext_auth",
        )
        return
    yield _error(
        (*_SH, "tls"),
        f"{setting} sends smart host passwords without encryption{clear}",
        "set tls: starttls (or tls: tls on port 465); allow_plaintext_auth: true accepts "
        "passwords in clear",
    )


def _plaintext_pop(v: _View) -> Iterator[Problem]:
    if not v.present(*_POP) or v.text(*_POP, "tls") != "none":
        return
    if v.flag(*_SH, "allow_plaintext_auth"):
        yield _warn(
            (*_POP, "tls"),
            "the POP3 password crosses the network in clear (tls: none)",
            "use tls: starttls or tls: tls if the POP3 server offers it",
        )
        return
    yield _error(
        (*_POP, "tls"),
        "tls: none sends the POP3 password without encryption",
        "use tls: starttls or tls: tls; routing.smarthost.allow_plaintext_auth: true accepts "
        "passwords in clear",
    )


def _unverified_tls(v: _View) -> Iterator[Problem]:
    if not v.present(*_SH) or v.flag(*_SH, "verify_tls"):
        return
    if _smtp_credentials(v) or v.present(*_POP):
        yield _warn(
            (*_SH, "verify_tls"),
            "passwords go to a server whose certificate is not verified",
            "keep verify_tls: true; for a private CA set ca_file instead",
        )
    if v.present(*_SH, "ca_file"):
        yield _warn(
            (*_SH, "ca_file"),
            "is not used: verify_tls is false",
            "set verify_tls: true to verify the smart host against this CA",
        )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _prefix_length(text: str) -> int | None:
    try:
        return ipaddress.ip_network(text, strict=False).prefixlen
    except ValueError:
        return None


def _listener(v: _View, index: int) -> Iterator[Problem]:
    nets = v.length("listen", index, "allow_networks")
    for j in range(nets):
        text = v.maybe("listen", index, "allow_networks", j)
        if isinstance(text, str) and _prefix_length(text) == 0:
            yield _error(
                ("listen", index, "allow_networks", j),
                f"{show(text)} lets every address relay: an open relay",
                "list only the networks of the applications that submit mail",
            )
    address = v.text("listen", index, "address")
    if address is not None and not _is_loopback(address) and nets == 0:
        yield _error(
            ("listen", index, "allow_networks"),
            f"is required: {address} is not a loopback address",
            "list the client networks allowed to relay, e.g. allow_networks: [192.0.2.0/24]; "
            "deliverd is never an open relay",
        )


def _listeners(v: _View) -> Iterator[Problem]:
    for index in range(v.length("listen")):
        try:
            yield from list(_listener(v, index))
        except _Skip:
            continue


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _smarthost_is_self(v: _View) -> Iterator[Problem]:
    host = v.text(*_SH, "host")
    if host is None:
        return
    name = v.maybe("host", "name")
    if isinstance(name, str) and host.lower().rstrip(".") == name.lower().rstrip("."):
        yield _error(
            (*_SH, "host"),
            "is this host itself (host.name)",
            "a smart host must be another machine: mail sent to it would loop back here",
        )
        return
    for i in range(v.length("host", "addresses")):
        own = v.maybe("host", "addresses", i)
        if isinstance(own, str) and _same_address(host, own):
            yield _error(
                (*_SH, "host"),
                f"is one of this host's own addresses (host.addresses[{i}])",
                "a smart host must be another machine: mail sent to it would loop back here",
            )
            return


def _per_account_without_credentials(v: _View) -> Iterator[Problem]:
    if not v.present(*_SH) or not v.flag(*_SH, "per_account_auth"):
        return
    if not _account_credentials(v):
        yield _warn(
            (*_SH, "per_account_auth"),
            "no account has its own credentials: every message uses the global auth",
            "give accounts a smarthost_auth (or mail_password with use_account_mail_passwords),"
            " or set per_account_auth: false",
        )


def _account_mail_passwords(v: _View) -> Iterator[Problem]:
    if not v.present(*_SH) or not v.flag(*_SH, "use_account_mail_passwords"):
        return
    where = (*_SH, "use_account_mail_passwords")
    yield _warn(
        where,
        "hands local mail passwords to the smart host",
        "prefer a smarthost_auth per account, made for relaying only",
    )
    if not v.flag(*_SH, "per_account_auth"):
        yield _warn(
            where,
            "does nothing while per_account_auth is false",
            "set per_account_auth: true, or remove use_account_mail_passwords",
        )


def _duration_order(first: str, second: str, *, strict: bool) -> Rule:
    """``retry.<first>`` must not exceed (``strict``: must be shorter than) ``retry.<second>``."""

    def rule(v: _View) -> Iterator[Problem]:
        a, b = v.text("retry", first), v.text("retry", second)
        if a is None or b is None:
            return
        sa, sb = parse_duration(a), parse_duration(b)
        if sa < sb or (sa == sb and not strict):
            return
        fa, fb = format_duration(sa), format_duration(sb)
        # Point at the field the author wrote: that is the one they will want to change.
        if v.present("retry", first) or not v.present("retry", second):
            relation = "not shorter than" if strict else "longer than"
            yield _error(
                ("retry", first),
                f"{fa} is {relation} retry.{second} ({fb})",
                f"make retry.{first} shorter than retry.{second}",
            )
        else:
            relation = "not longer than" if strict else "shorter than"
            yield _error(
                ("retry", second),
                f"{fb} is {relation} retry.{first} ({fa})",
                f"make retry.{second} longer than retry.{first}",
            )

    return rule


def _duplicate_accounts(v: _View) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for i in range(v.length("accounts")):
        address = v.maybe("accounts", i, "address")
        if not isinstance(address, str):
            continue
        key = address.lower()
        if key in seen:
            yield _error(
                ("accounts", i, "address"),
                f"repeats accounts[{seen[key]}].address",
                "list each account once (addresses compare case-insensitively)",
            )
        else:
            seen[key] = i


def _session_limits(v: _View) -> Iterator[Problem]:
    per, total = v.number("limits", "per_destination"), v.number("limits", "max_sessions")
    if per is not None and total is not None and per > total:
        yield _error(
            ("limits", "per_destination"),
            f"{per} is more than limits.max_sessions ({total})",
            "per_destination must not exceed max_sessions",
        )


def _tls_port(v: _View) -> Iterator[Problem]:
    if not v.present(*_SH):
        return
    tls, port = _effective_tls(v), v.number(*_SH, "port")
    if tls == "tls" and port in (25, 587):
        yield _warn(
            (*_SH, "port"),
            f"port {port} normally speaks STARTTLS, not implicit TLS (tls: tls)",
            "implicit TLS is normally port 465; for port 25 or 587 use tls: starttls",
        )
    elif tls == "starttls" and port == 465:
        yield _warn(
            (*_SH, "tls"),
            "port 465 normally expects implicit TLS, not STARTTLS",
            "use tls: tls for port 465, or port 587 with tls: starttls",
        )


def _host_name_fqdn(v: _View) -> Iterator[Problem]:
    name = v.text("host", "name")
    if name is not None and "." not in name.rstrip("."):
        yield _warn(
            ("host", "name"),
            f"{show(name)} is not a fully qualified domain name",
            "use the name other servers know this host by, such as mail.example.com",
        )


def _local_domains(v: _View) -> set[str]:
    domains = v.get("local", "domains")
    if isinstance(domains, list):
        return {str(d).lower().rstrip(".") for d in domains}
    name = v.get("host", "name")  # the default: localhost and host.name
    return {"localhost", str(name).lower().rstrip(".")}


def _alias_targets_local(v: _View) -> Iterator[Problem]:
    aliases = v.get("local", "aliases")
    if not isinstance(aliases, dict):
        return
    local = _local_domains(v)
    for user, targets in aliases.items():
        for index, target in enumerate(targets if isinstance(targets, list) else []):
            domain = str(target).rpartition("@")[2].lower().rstrip(".")
            if domain in local:
                yield _error(
                    ("local", "aliases", user, index),
                    f"{show(target)} is in a local domain: aliases apply once and deliverd "
                    "delivers nothing on this host, so this mail could go nowhere",
                    "point the alias at an address in a domain not listed in local.domains",
                )


_RULES: tuple[Rule, ...] = (
    _smarthost_needed,
    _smarthost_ignored,
    _plaintext_smtp_auth,
    _plaintext_pop,
    _unverified_tls,
    _listeners,
    _smarthost_is_self,
    _per_account_without_credentials,
    _account_mail_passwords,
    _duration_order("interval", "max_interval", strict=False),
    _duration_order("temp_error_delay", "expire_after", strict=False),
    _duration_order("interval", "expire_after", strict=True),
    _duplicate_accounts,
    _session_limits,
    _tls_port,
    _host_name_fqdn,
    _alias_targets_local,
)


def semantic_problems(spec: Mapping[str, object], bad: Taint) -> list[Problem]:
    view = _View(spec, bad)
    problems: list[Problem] = []
    for rule in _RULES:
        try:
            problems.extend(rule(view))
        except _Skip:
            continue
    return problems
