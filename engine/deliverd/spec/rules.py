"""The semantic rules: what relates one field of a spec to another, beyond the schema.

Each rule reads the spec through a ``View`` that refuses (``Skip``) values the schema or the
format checks already rejected, so one mistake is reported once. Credentials need TLS, a
non-loopback listener needs ``allow_networks``, the smart host may not be this host, retry
durations must be ordered, and so on: one small generator per rule, listed in ``_RULES``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping

from deliverd.core.units import format_duration, parse_duration
from deliverd.spec.dkim_rules import dkim_headers, duplicate_dkim_selectors
from deliverd.spec.problems import (
    PathParts,
    Problem,
    Taint,
    show,
)
from deliverd.spec.route_rules import duplicate_route_names, route_modes, shadowed_routes
from deliverd.spec.view import Rule, Skip, SmarthostRule, View, error, warn

_SH: PathParts = ("routing", "smarthost")


def _smarthost_needed(v: View) -> Iterator[Problem]:
    mode = v.text("routing", "mode")
    if mode in ("smarthost", "direct_then_smarthost") and not v.present(*_SH):
        yield error(
            _SH,
            f"is required when routing.mode is {mode}",
            "add the smart host, e.g. smarthost: {host: relay.example.com, port: 587}",
        )


def _smarthost_ignored(v: View) -> Iterator[Problem]:
    if v.text("routing", "mode") == "direct" and v.present(*_SH):
        yield warn(
            _SH,
            "is ignored: routing.mode is direct",
            "set routing.mode to smarthost or direct_then_smarthost, or remove the smart host",
        )


def _accounts_with(v: View, field: str) -> bool:
    return any(v.present("accounts", i, field) for i in range(v.length("accounts")))


def _account_credentials(v: View, sh: PathParts) -> bool:
    """Whether some account brings its own smart host password (per-account auth only)."""
    if not v.flag(*sh, "per_account_auth"):
        return False
    if _accounts_with(v, "smarthost_auth"):
        return True
    return v.flag(*sh, "use_account_mail_passwords") and _accounts_with(v, "mail_password")


def _smtp_credentials(v: View, sh: PathParts) -> bool:
    return v.present(*sh, "auth") or _account_credentials(v, sh)


def _effective_tls(v: View, sh: PathParts) -> str:
    written = v.get(*sh, "tls")
    if isinstance(written, str):
        return written
    return "starttls" if v.present(*sh, "auth") else "opportunistic"


def _plaintext_smtp_auth(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh) or not _smtp_credentials(v, sh):
        return
    tls = _effective_tls(v, sh)
    if tls not in ("none", "opportunistic"):
        return
    clear = "" if tls == "none" else " whenever the smart host does not offer STARTTLS"
    setting = f"tls: {tls}" if v.present(*sh, "tls") else f"the default tls ({tls})"
    if v.flag(*sh, "allow_plaintext_auth"):
        yield warn(
            (*sh, "allow_plaintext_auth"),
            f"smart host passwords may cross the network in clear (tls: {tls})",
            "set tls: starttls (or tls: tls on port 465) and drop allow_plaintext_auth",
        )
        return
    yield error(
        (*sh, "tls"),
        f"{setting} sends smart host passwords without encryption{clear}",
        "set tls: starttls (or tls: tls on port 465); allow_plaintext_auth: true accepts "
        "passwords in clear",
    )


def _plaintext_pop(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh, "pop_before_smtp") or v.text(*sh, "pop_before_smtp", "tls") != "none":
        return
    if v.flag(*sh, "allow_plaintext_auth"):
        yield warn(
            (*sh, "pop_before_smtp", "tls"),
            "the POP3 password crosses the network in clear (tls: none)",
            "use tls: starttls or tls: tls if the POP3 server offers it",
        )
        return
    yield error(
        (*sh, "pop_before_smtp", "tls"),
        "tls: none sends the POP3 password without encryption",
        "use tls: starttls or tls: tls; the smart host's allow_plaintext_auth: true accepts "
        "passwords in clear",
    )


def _unverified_tls(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh) or v.flag(*sh, "verify_tls"):
        return
    if _smtp_credentials(v, sh) or v.present(*sh, "pop_before_smtp"):
        yield warn(
            (*sh, "verify_tls"),
            "passwords go to a server whose certificate is not verified",
            "keep verify_tls: true; for a private CA set ca_file instead",
        )
    if v.present(*sh, "ca_file"):
        yield warn(
            (*sh, "ca_file"),
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


def _listener(v: View, index: int) -> Iterator[Problem]:
    nets = v.length("listen", index, "allow_networks")
    for j in range(nets):
        text = v.maybe("listen", index, "allow_networks", j)
        if isinstance(text, str) and _prefix_length(text) == 0:
            yield error(
                ("listen", index, "allow_networks", j),
                f"{show(text)} lets every address relay: an open relay",
                "list only the networks of the applications that submit mail",
            )
    address = v.text("listen", index, "address")
    if address is not None and not _is_loopback(address) and nets == 0:
        yield error(
            ("listen", index, "allow_networks"),
            f"is required: {address} is not a loopback address",
            "list the client networks allowed to relay, e.g. allow_networks: [192.0.2.0/24]; "
            "deliverd is never an open relay",
        )


def _listeners(v: View) -> Iterator[Problem]:
    for index in range(v.length("listen")):
        try:
            yield from list(_listener(v, index))
        except Skip:
            continue


def _metrics_endpoint(v: View) -> Iterator[Problem]:
    """The Prometheus endpoint follows the listeners' rule: loopback, or named networks."""
    nets = v.length("metrics", "allow_networks")
    for j in range(nets):
        text = v.maybe("metrics", "allow_networks", j)
        if isinstance(text, str) and _prefix_length(text) == 0:
            yield error(
                ("metrics", "allow_networks", j),
                f"{show(text)} lets every address read the metrics",
                "list only the networks of the Prometheus servers that scrape this host",
            )
    listen = v.text("metrics", "listen")
    if listen is None:
        return
    address = listen[1:].partition("]")[0] if listen.startswith("[") else listen.rpartition(":")[0]
    if not _is_loopback(address) and nets == 0:
        yield error(
            ("metrics", "allow_networks"),
            f"is required: {address} is not a loopback address",
            "list the networks of the Prometheus servers, e.g. allow_networks: [192.0.2.0/24]",
        )


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _smarthost_names(v: View, sh: PathParts) -> Iterator[tuple[PathParts, str]]:
    """Every smart host name written: ``host``, or each entry of the ``hosts`` list."""
    host = v.text(*sh, "host")
    if host is not None:
        yield (*sh, "host"), host
    for i in range(v.length(*sh, "hosts")):
        entry = v.maybe(*sh, "hosts", i, "host")
        if isinstance(entry, str):
            yield (*sh, "hosts", i, "host"), entry


def _smarthost_target(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh):
        return
    single, listed = v.present(*sh, "host"), v.present(*sh, "hosts")
    if not single and not listed:
        yield error(
            (*sh, "host"),
            "is required (or hosts, an ordered failover list)",
            "a host name or an IP address (host: relay.example.com), or a failover list"
            " (hosts: [{host: relay1.example.com, port: 587}, {host: relay2.example.com}])",
        )
    elif single and listed:
        yield error(
            (*sh, "hosts"),
            "cannot be set together with host",
            "move host and port into the hosts list as its first entry, or remove hosts",
        )
    elif listed and v.present(*sh, "port"):
        yield warn(
            (*sh, "port"),
            "is ignored when hosts is set: each entry of hosts has its own port",
            "write the port on each entry of hosts and remove this one",
        )


def _smarthost_is_self(v: View, sh: PathParts) -> Iterator[Problem]:
    for path, host in _smarthost_names(v, sh):
        yield from _one_smarthost_is_self(v, path, host)


def _one_smarthost_is_self(v: View, path: PathParts, host: str) -> Iterator[Problem]:
    name = v.maybe("host", "name")
    if isinstance(name, str) and host.lower().rstrip(".") == name.lower().rstrip("."):
        yield error(
            path,
            "is this host itself (host.name)",
            "a smart host must be another machine: mail sent to it would loop back here",
        )
        return
    for i in range(v.length("host", "addresses")):
        own = v.maybe("host", "addresses", i)
        if isinstance(own, str) and _same_address(host, own):
            yield error(
                path,
                f"is one of this host's own addresses (host.addresses[{i}])",
                "a smart host must be another machine: mail sent to it would loop back here",
            )
            return


def _per_account_without_credentials(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh) or not v.flag(*sh, "per_account_auth"):
        return
    if not _account_credentials(v, sh):
        yield warn(
            (*sh, "per_account_auth"),
            "no account has its own credentials: every message uses the global auth",
            "give accounts a smarthost_auth (or mail_password with use_account_mail_passwords),"
            " or set per_account_auth: false",
        )


def _account_mail_passwords(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh) or not v.flag(*sh, "use_account_mail_passwords"):
        return
    where = (*sh, "use_account_mail_passwords")
    yield warn(
        where,
        "hands local mail passwords to the smart host",
        "prefer a smarthost_auth per account, made for relaying only",
    )
    if not v.flag(*sh, "per_account_auth"):
        yield warn(
            where,
            "does nothing while per_account_auth is false",
            "set per_account_auth: true, or remove use_account_mail_passwords",
        )


def _duration_order(first: str, second: str, *, strict: bool) -> Rule:
    """``retry.<first>`` must not exceed (``strict``: must be shorter than) ``retry.<second>``."""

    def rule(v: View) -> Iterator[Problem]:
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
            yield error(
                ("retry", first),
                f"{fa} is {relation} retry.{second} ({fb})",
                f"make retry.{first} shorter than retry.{second}",
            )
        else:
            relation = "not longer than" if strict else "shorter than"
            yield error(
                ("retry", second),
                f"{fb} is {relation} retry.{first} ({fa})",
                f"make retry.{second} longer than retry.{first}",
            )

    return rule


def _duplicate_accounts(v: View) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for i in range(v.length("accounts")):
        address = v.maybe("accounts", i, "address")
        if not isinstance(address, str):
            continue
        key = address.lower()
        if key in seen:
            yield error(
                ("accounts", i, "address"),
                f"repeats accounts[{seen[key]}].address",
                "list each account once (addresses compare case-insensitively)",
            )
        else:
            seen[key] = i


def _session_limits(v: View) -> Iterator[Problem]:
    per, total = v.number("limits", "per_destination"), v.number("limits", "max_sessions")
    if per is not None and total is not None and per > total:
        yield error(
            ("limits", "per_destination"),
            f"{per} is more than limits.max_sessions ({total})",
            "per_destination must not exceed max_sessions",
        )


def _tls_port(v: View, sh: PathParts) -> Iterator[Problem]:
    if not v.present(*sh):
        return
    tls = _effective_tls(v, sh)
    ports: list[PathParts] = [(*sh, "hosts", i, "port") for i in range(v.length(*sh, "hosts"))]
    for path in ports or [(*sh, "port")]:
        port = v.number(*path)
        if tls == "tls" and port in (25, 587):
            yield warn(
                path,
                f"port {port} normally speaks STARTTLS, not implicit TLS (tls: tls)",
                "implicit TLS is normally port 465; for port 25 or 587 use tls: starttls",
            )
        elif tls == "starttls" and port == 465:
            yield warn(
                (*sh, "tls"),
                "port 465 normally expects implicit TLS, not STARTTLS",
                "use tls: tls for port 465, or port 587 with tls: starttls",
            )


def _host_name_fqdn(v: View) -> Iterator[Problem]:
    name = v.text("host", "name")
    if name is not None and "." not in name.rstrip("."):
        yield warn(
            ("host", "name"),
            f"{show(name)} is not a fully qualified domain name",
            "use the name other servers know this host by, such as mail.example.com",
        )


def smarthost_paths(v: View) -> list[PathParts]:
    """Where smart hosts are written: routing.smarthost and each route's smarthost."""
    paths = [_SH] if v.present(*_SH) else []
    for i in range(v.length("routes")):
        try:
            if v.present("routes", i, "smarthost"):
                paths.append(("routes", i, "smarthost"))
        except Skip:
            continue
    return paths


def _for_each_smarthost(rule: SmarthostRule) -> Rule:
    """A smart host rule applied to every smart host of the spec, each judged on its own."""

    def each(v: View) -> Iterator[Problem]:
        for sh in smarthost_paths(v):
            try:
                yield from list(rule(v, sh))
            except Skip:
                continue

    return each


def _local_domains(v: View) -> set[str]:
    domains = v.get("local", "domains")
    if isinstance(domains, list):
        return {str(d).lower().rstrip(".") for d in domains}
    name = v.get("host", "name")  # the default: localhost and host.name
    return {"localhost", str(name).lower().rstrip(".")}


def _alias_targets_local(v: View) -> Iterator[Problem]:
    aliases = v.get("local", "aliases")
    if not isinstance(aliases, dict):
        return
    local = _local_domains(v)
    for user, targets in aliases.items():
        for index, target in enumerate(targets if isinstance(targets, list) else []):
            domain = str(target).rpartition("@")[2].lower().rstrip(".")
            if domain in local:
                yield error(
                    ("local", "aliases", user, index),
                    f"{show(target)} is in a local domain: aliases apply once and deliverd "
                    "delivers nothing on this host, so this mail could go nowhere",
                    "point the alias at an address in a domain not listed in local.domains",
                )


_RULES: tuple[Rule, ...] = (
    _smarthost_needed,
    _smarthost_ignored,
    _for_each_smarthost(_smarthost_target),
    _for_each_smarthost(_plaintext_smtp_auth),
    _for_each_smarthost(_plaintext_pop),
    _for_each_smarthost(_unverified_tls),
    _listeners,
    _metrics_endpoint,
    _for_each_smarthost(_smarthost_is_self),
    _for_each_smarthost(_per_account_without_credentials),
    _for_each_smarthost(_account_mail_passwords),
    _duration_order("interval", "max_interval", strict=False),
    _duration_order("temp_error_delay", "expire_after", strict=False),
    _duration_order("interval", "expire_after", strict=True),
    _duplicate_accounts,
    _session_limits,
    _for_each_smarthost(_tls_port),
    _host_name_fqdn,
    duplicate_route_names,
    route_modes,
    shadowed_routes,
    _alias_targets_local,
    duplicate_dkim_selectors,
    dkim_headers,
)


def semantic_problems(spec: Mapping[str, object], bad: Taint) -> list[Problem]:
    view = View(spec, bad)
    problems: list[Problem] = []
    for rule in _RULES:
        try:
            problems.extend(rule(view))
        except Skip:
            continue
    return problems
