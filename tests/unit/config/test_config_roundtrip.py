"""spec -> render -> write -> load_config -> config_to_spec gives the normalised spec back.

The property covers every key of the schema; passwords are generated with a "pw-" prefix so
that their absence from the world-readable deliverd.toml can be checked by substring.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deliverd.config.convert import config_to_spec
from deliverd.config.loader import ConfigError, load_config, load_config_tree
from deliverd.core.units import parse_duration
from deliverd.spec.normalise import normalise
from deliverd.spec.problems import errors
from deliverd.spec.render import write_rendered
from deliverd.spec.validation import validate_spec

PASSWORD_PREFIX = "pw-"

# --- strategies --------------------------------------------------------------------------------

_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_label, min_size=1, max_size=3),
    st.sampled_from(["example.com", "example.net", "example.org"]),
)
ipv4_doc = st.integers(1, 254).map(lambda n: f"192.0.2.{n}")
ipv6_doc = st.integers(1, 0xFFFF).map(lambda n: f"2001:db8::{n:x}")
public_ips = st.one_of(ipv4_doc, ipv6_doc)
loopback_ips = st.one_of(st.integers(1, 254).map(lambda n: f"127.0.0.{n}"), st.just("::1"))
ports = st.integers(1, 65535)


def _spelled_duration(seconds: int, unit: str, zeros: int) -> str:
    return "0" * zeros + str(seconds) + unit


durations = st.builds(
    _spelled_duration,
    st.integers(0, 5000),
    st.sampled_from("smhd"),
    st.integers(0, 2),
)
sizes = st.builds(
    lambda n, unit, zeros: "0" * zeros + f"{n}{unit}",
    st.integers(1, 100_000),
    st.sampled_from(["B", "KB", "MB", "GB"]),
    st.integers(0, 1),
)
# Anything TOML or JSON could mistake for syntax, plus unicode beyond the BMP and controls.
tricky_chars = st.characters(exclude_categories=("Cs",))
passwords = st.text(tricky_chars, min_size=1, max_size=16).map(lambda s: PASSWORD_PREFIX + s)
usernames = st.text(
    st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=12
).filter(lambda s: re.fullmatch(r"[^\s]+", s) is not None and PASSWORD_PREFIX not in s)
paths = st.text(
    st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20
).map(lambda s: "/" + s).filter(lambda s: PASSWORD_PREFIX not in s)
credentials = st.fixed_dictionaries({"username": usernames, "password": passwords})


def _maybe(
    draw: st.DrawFn, key: str, strategy: st.SearchStrategy[Any], out: dict[str, Any]
) -> None:
    """Set key from strategy, or leave it out so the normaliser fills the default."""
    if draw(st.booleans()):
        out[key] = draw(strategy)


@st.composite
def listeners(draw: st.DrawFn) -> list[dict[str, Any]]:
    result = []
    addresses = draw(st.lists(st.one_of(loopback_ips, public_ips), min_size=1, max_size=3))
    for address in addresses:
        listener: dict[str, Any] = {"address": address}
        _maybe(draw, "port", ports, listener)
        if not ipaddress.ip_address(address).is_loopback:
            # Never an open relay: a non-loopback listener names who may use it.
            nets = st.sampled_from(["192.0.2.0/24", "198.51.100.0/28", "2001:db8::/64"])
            listener["allow_networks"] = draw(st.lists(nets, min_size=1, max_size=3, unique=True))
        elif draw(st.booleans()):
            listener["allow_networks"] = []
        result.append(listener)
    return result


@st.composite
def smarthosts(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        sh: dict[str, Any] = {"host": draw(hostnames)}
        _maybe(draw, "port", ports, sh)
    else:  # a failover list
        entries = draw(st.lists(hostnames, min_size=1, max_size=3))
        sh = {"hosts": [{"host": h} for h in entries]}
        for entry in sh["hosts"]:
            _maybe(draw, "port", ports, entry)
    _maybe(draw, "resolve_mx", st.booleans(), sh)
    _maybe(draw, "verify_tls", st.booleans(), sh)
    _maybe(draw, "ca_file", paths, sh)
    _maybe(draw, "bounce_on_5xx", st.booleans(), sh)
    _maybe(draw, "auth", credentials, sh)
    if draw(st.booleans()):
        sh["per_account_auth"] = True
        _maybe(draw, "use_account_mail_passwords", st.booleans(), sh)
    else:
        _maybe(draw, "per_account_auth", st.just(False), sh)
    if draw(st.booleans()):
        pop: dict[str, Any] = {
            "host": draw(hostnames),
            "username": draw(usernames),
            "password": draw(passwords),
        }
        _maybe(draw, "port", ports, pop)
        _maybe(draw, "tls", st.sampled_from(["starttls", "tls", "none"]), pop)
        _maybe(draw, "valid_for", durations.filter(lambda d: parse_duration(d) > 0), pop)
        sh["pop_before_smtp"] = pop
    tls = draw(st.none() | st.sampled_from(["starttls", "tls", "opportunistic", "none"]))
    if tls is not None:
        sh["tls"] = tls
    # Passwords may cross in clear only when the spec says so explicitly.
    effective = tls or ("starttls" if "auth" in sh else "opportunistic")
    smtp_clear = effective in ("opportunistic", "none") and (
        "auth" in sh or sh.get("per_account_auth", False)
    )
    pop_clear = sh.get("pop_before_smtp", {}).get("tls") == "none"
    if smtp_clear or pop_clear:
        sh["allow_plaintext_auth"] = True
    else:
        _maybe(draw, "allow_plaintext_auth", st.booleans(), sh)
    return sh


_domain_patterns = st.builds(lambda dot, h: dot + h, st.sampled_from(["", "."]), hostnames)


@st.composite
def routes(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(_label, max_size=3, unique=True))
    result = []
    for name in names:
        match: dict[str, Any] = {}
        _maybe(draw, "sender", st.lists(st.builds(lambda a, h: f"{a}@{h}", _label, hostnames),
                                        min_size=1, max_size=2), match)
        _maybe(draw, "sender_domain", st.lists(_domain_patterns, min_size=1, max_size=2), match)
        if not match or draw(st.booleans()):
            match["recipient_domain"] = draw(st.lists(_domain_patterns, min_size=1, max_size=2))
        route: dict[str, Any] = {"name": name, "match": match}
        if draw(st.booleans()):
            route["smarthost"] = draw(smarthosts())
            _maybe(draw, "mode", st.sampled_from(["smarthost", "direct_then_smarthost"]), route)
        else:
            _maybe(draw, "mode", st.just("direct"), route)
        result.append(route)
    return result


@st.composite
def accounts(draw: st.DrawFn) -> list[dict[str, Any]]:
    locals_ = draw(st.lists(_label, max_size=3, unique=True))
    domain = draw(hostnames)
    result = []
    for local in locals_:
        account: dict[str, Any] = {"address": f"{local}@{domain}"}
        _maybe(draw, "smarthost_auth", credentials, account)
        _maybe(draw, "mail_password", passwords, account)
        result.append(account)
    return result


def _ordered(draw: st.DrawFn, count: int) -> list[str]:
    """Durations in increasing order, so intervals never exceed their caps."""
    values = draw(st.lists(durations.filter(lambda d: parse_duration(d) > 0), min_size=count,
                           max_size=count))
    return sorted(values, key=parse_duration)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(hostnames)
    spec: dict[str, Any] = {"version": 1, "host": {"name": name}}
    _maybe(draw, "addresses", st.lists(public_ips, max_size=3, unique=True), spec["host"])
    _maybe(draw, "listen", listeners(), spec)
    _maybe(draw, "queue", paths.map(lambda p: {"path": p}), spec)
    mode = draw(st.sampled_from(["direct", "smarthost", "direct_then_smarthost", None]))
    routing: dict[str, Any] = {}
    if mode is not None:
        routing["mode"] = mode
    if mode in ("smarthost", "direct_then_smarthost") or draw(st.booleans()):
        routing["smarthost"] = draw(smarthosts())
    direct: dict[str, Any] = {}
    _maybe(draw, "port", ports, direct)
    _maybe(draw, "bounce_on_no_mx", st.booleans(), direct)
    _maybe(draw, "bounce_on_mx_5xx", st.booleans(), direct)
    _maybe(draw, "tls", st.sampled_from(["opportunistic", "required"]), direct)
    _maybe(draw, "mta_sts", st.booleans(), direct)
    _maybe(draw, "dane", st.booleans(), direct)
    if direct or draw(st.booleans()):
        routing["direct"] = direct
    _maybe(draw, "abort_on_rcpt_5xx", st.booleans(), routing)
    if routing or draw(st.booleans()):
        spec["routing"] = routing
    _maybe(draw, "routes", routes(), spec)
    _maybe(draw, "accounts", accounts(), spec)
    if draw(st.booleans()):
        delay, interval, cap, expire = _ordered(draw, 4)
        retry = {"temp_error_delay": delay, "interval": interval, "max_interval": cap,
                 "expire_after": expire}
        _maybe(draw, "on_expiry", st.sampled_from(["bounce", "hold"]), retry)
        spec["retry"] = retry
    dsn: dict[str, Any] = {}
    for key in ("notify_delayed", "include_transcript", "notify_postmaster"):
        _maybe(draw, key, st.booleans(), dsn)
    _maybe(draw, "postmaster", st.builds(lambda h: f"postmaster@{h}", hostnames), dsn)
    _maybe(draw, "dsn", st.just(dsn), spec)
    tls_reports: dict[str, Any] = {}
    _maybe(draw, "enabled", st.booleans(), tls_reports)
    _maybe(draw, "from", st.builds(lambda h: f"tlsrpt@{h}", hostnames), tls_reports)
    _maybe(draw, "interval", durations, tls_reports)
    _maybe(draw, "tls_reports", st.just(tls_reports), spec)
    if draw(st.booleans()):
        per_destination, max_sessions = sorted(draw(st.lists(st.integers(1, 10000), min_size=2,
                                                             max_size=2)))
        limits: dict[str, Any] = {"max_sessions": max_sessions, "per_destination": per_destination}
        _maybe(draw, "messages_per_session", st.integers(0, 1_000_000), limits)
        _maybe(draw, "connection_failure_cache", durations, limits)
        _maybe(draw, "max_hops", st.integers(1, 1000), limits)
        _maybe(draw, "max_message_size", sizes, limits)
        spec["limits"] = limits
    timeouts: dict[str, Any] = {}
    for key in ("connect", "greeting", "command", "data_response", "dns"):
        _maybe(draw, key, durations.filter(lambda d: parse_duration(d) > 0), timeouts)
    _maybe(draw, "timeouts", st.just(timeouts), spec)
    nameservers = st.one_of(
        public_ips,
        st.builds(lambda ip, port: f"{ip}:{port}", ipv4_doc, ports),
        st.builds(lambda n, port: f"[2001:db8::{n:x}]:{port}", st.integers(1, 0xFFFF), ports),
        loopback_ips.filter(lambda ip: ":" not in ip),
    )
    _maybe(draw, "dns", st.lists(nameservers, max_size=3, unique=True)
           .map(lambda ns: {"nameservers": ns}), spec)
    if draw(st.booleans()):
        metrics: dict[str, Any] = {}
        address = draw(st.one_of(loopback_ips, public_ips))
        shown = f"[{address}]" if ":" in address else address
        _maybe(draw, "listen", ports.map(lambda p: f"{shown}:{p}"), metrics)
        if not ipaddress.ip_address(address).is_loopback:
            metrics["allow_networks"] = ["192.0.2.0/24"]
        spec["metrics"] = metrics
    users = st.from_regex(r"\A[a-z_][a-z0-9._-]{0,15}\Z")
    local: dict[str, Any] = {}
    _maybe(draw, "qualify_domain", hostnames, local)
    # Alias targets outside every local domain (the default ones: localhost and host.name).
    targets = st.lists(st.builds(lambda u: f"{u}@elsewhere.example", users), min_size=1,
                       max_size=3, unique=True)
    _maybe(draw, "aliases", st.dictionaries(st.one_of(users, st.just("*")), targets,
                                            max_size=3), local)
    _maybe(draw, "local", st.just(local), spec)
    masquerade: dict[str, Any] = {}
    _maybe(draw, "domain", hostnames, masquerade)
    _maybe(draw, "except_users", st.lists(users, max_size=3, unique=True), masquerade)
    _maybe(draw, "masquerade", st.just(masquerade), spec)
    selectors = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,10}[a-z0-9]\Z")
    dkim_entry = st.fixed_dictionaries(
        {"domain": hostnames, "selector": selectors,
         "key_file": st.builds(lambda s: f"/etc/deliverd/dkim/{s}.key", selectors)},
        optional={"algorithm": st.sampled_from(["rsa-sha256", "ed25519-sha256"]),
                  "headers": st.lists(st.sampled_from(["To", "Subject", "Date", "X-Tag"]),
                                      max_size=3, unique=True).map(lambda h: ["From", *h])},
    )
    same_name = lambda e: (e["domain"].lower().rstrip("."), e["selector"])  # noqa: E731
    _maybe(draw, "dkim", st.lists(dkim_entry, max_size=3, unique_by=same_name), spec)
    return spec


def _passwords(tree: object) -> list[str]:
    if isinstance(tree, dict):
        found = [v for k, v in tree.items() if k in ("password", "mail_password")]
        return found + [p for v in tree.values() for p in _passwords(v)]
    if isinstance(tree, list):
        return [p for item in tree for p in _passwords(item)]
    return []


def _secret_values(tree: object) -> list[str]:
    if isinstance(tree, dict):
        return [p for v in tree.values() for p in _secret_values(v)]
    return [tree] if isinstance(tree, str) else []


def _roundtrip(spec: dict[str, Any], directory: Path) -> None:
    normalised = normalise(spec)
    config_path, secrets_path = write_rendered(normalised, directory)
    config_text = config_path.read_text(encoding="utf-8")
    secrets_text = secrets_path.read_text(encoding="utf-8")

    assert config_to_spec(load_config(config_path)) == normalised
    assert PASSWORD_PREFIX not in config_text
    tomllib.loads(config_text)
    passwords_in_spec = sorted(_passwords(normalised))
    assert sorted(_secret_values(tomllib.loads(secrets_text))) == passwords_in_spec


# --- the property ------------------------------------------------------------------------------


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(specs())
def test_any_valid_spec_survives_render_and_load_with_passwords_only_in_secrets(
    spec: dict[str, Any],
) -> None:
    assume(not errors(validate_spec(spec)))
    with tempfile.TemporaryDirectory() as directory:
        _roundtrip(spec, Path(directory))


def test_generated_specs_are_mostly_valid() -> None:
    """Guards the property above: it proves nothing if the validator rejects what it draws."""
    valid = 0
    total = 60

    @settings(max_examples=total, deadline=None, database=None)
    @given(specs())
    def count(spec: dict[str, Any]) -> None:
        nonlocal valid
        if not errors(validate_spec(spec)):
            valid += 1

    count()
    assert valid >= total * 0.8, f"only {valid} of {total} generated specs were valid"


# --- tricky strings ----------------------------------------------------------------------------

TRICKY = [
    'quote"inside',
    "back\\slash\\",
    'triple"""quotes',
    "triple'''single",
    "new\nline\r\nand\ttab",
    "ünïcødé-ß-日本語",
    "astral-😀-𝄞",
    "nul\x00del\x7fesc\x1b",
    "# not a comment",
    "[not.a.table]",
    "key = value",
    "\\u0041-not-an-escape",
]


def _base_spec() -> dict[str, Any]:
    return {
        "version": 1,
        "host": {"name": "mail.example.com"},
        "routing": {
            "mode": "smarthost",
            "smarthost": {
                "host": "smtp.example.net",
                "port": 587,
                "tls": "starttls",
                "auth": {"username": "relay", "password": "pw-relay"},
                "pop_before_smtp": {
                    "host": "pop.example.net",
                    "username": "popper",
                    "password": "pw-pop",
                },
            },
        },
        "accounts": [
            {"address": "a@example.com",
             "smarthost_auth": {"username": "a", "password": "pw-a"},
             "mail_password": "pw-a-mail"},
        ],
    }


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_survive_the_round_trip(text: str, tmp_path: Path) -> None:
    spec = _base_spec()
    smarthost = spec["routing"]["smarthost"]
    # The validator refuses control characters and (in user names) spaces outside passwords.
    one_line = re.sub(r"[\x00-\x1f\x7f]", "_", text)
    no_space = re.sub(r"\s", "_", one_line)
    smarthost["auth"] = {"username": no_space, "password": PASSWORD_PREFIX + text}
    smarthost["pop_before_smtp"]["username"] = no_space + "-pop"
    smarthost["pop_before_smtp"]["password"] = PASSWORD_PREFIX + text + "-pop"
    smarthost["ca_file"] = "/etc/" + one_line
    spec["queue"] = {"path": "/var/" + one_line}
    spec["accounts"][0]["smarthost_auth"]["password"] = PASSWORD_PREFIX + text + "-acct"
    spec["accounts"][0]["mail_password"] = PASSWORD_PREFIX + text + "-mail"
    assert not errors(validate_spec(spec))

    _roundtrip(spec, tmp_path)
    loaded = load_config(tmp_path / "deliverd.toml")
    assert loaded.routing.smarthost is not None
    assert loaded.routing.smarthost.auth is not None
    assert loaded.routing.smarthost.auth.password == PASSWORD_PREFIX + text
    assert loaded.routing.smarthost.auth.username == no_space
    assert loaded.routing.smarthost.ca_file == "/etc/" + one_line
    assert loaded.queue.path == "/var/" + one_line


def test_account_address_with_quotes_and_unicode_keys_its_secrets(tmp_path: Path) -> None:
    spec = _base_spec()
    spec["accounts"] = [
        {"address": 'odd"name\\x@exämple.com', "mail_password": "pw-odd"},
        {"address": "[x]@example.com", "mail_password": "pw-brackets"},
        {"address": "plain@example.com", "mail_password": "pw-plain"},
    ]
    _roundtrip(spec, tmp_path)
    mails = {a.address: a.mail_password for a in load_config(tmp_path / "deliverd.toml").accounts}
    assert mails == {
        'odd"name\\x@exämple.com': "pw-odd",
        "[x]@example.com": "pw-brackets",
        "plain@example.com": "pw-plain",
    }


# --- the loader's own rules --------------------------------------------------------------------


def _rendered(tmp_path: Path, spec: dict[str, Any] | None = None) -> tuple[Path, Path]:
    return write_rendered(normalise(spec or _base_spec()), tmp_path)


def test_load_config_tree_returns_the_normalised_spec_with_secrets(tmp_path: Path) -> None:
    config_path, _ = _rendered(tmp_path)
    assert load_config_tree(config_path) == normalise(_base_spec())


def test_secrets_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path)
    secrets_path.chmod(0o640)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert "chmod 600" in str(caught.value)
    assert not caught.value.unreadable


def test_missing_secrets_file_is_fine_when_no_secret_is_needed(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path, {"version": 1, "host": {"name": "a.example"}})
    secrets_path.unlink()
    assert load_config(config_path).host.name == "a.example"


def test_missing_secrets_file_names_the_password_pointer_and_the_file(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path)
    secrets_path.unlink()
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    pointers = {p.pointer.removesuffix("/password") for p in caught.value.problems}
    assert "/routing/smarthost/auth" in pointers
    assert "/routing/smarthost/pop_before_smtp" in pointers
    assert "/accounts/0/smarthost_auth" in pointers
    assert all(str(secrets_path) in p.hint for p in caught.value.problems)


def test_secret_for_an_unknown_account_is_an_error_at_accounts(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path)
    with secrets_path.open("a", encoding="utf-8") as fh:
        fh.write('[accounts."ghost@example.com"]\nmail_password = "pw-ghost"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert [p.pointer for p in caught.value.problems] == ["/accounts"]
    assert "ghost@example.com" in str(caught.value)
    assert "pw-ghost" not in str(caught.value)


def test_password_written_into_the_config_file_is_refused(tmp_path: Path) -> None:
    config_path, _ = _rendered(tmp_path)
    text = config_path.read_text(encoding="utf-8")
    text = text.replace('username = "relay"', 'username = "relay"\npassword = "pw-leak"')
    config_path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert [p.pointer for p in caught.value.problems] == ["/routing/smarthost/auth/password"]
    assert "pw-leak" not in str(caught.value)


def test_non_password_setting_in_secrets_file_is_refused(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path)
    with secrets_path.open("a", encoding="utf-8") as fh:
        fh.write('[routing.smarthost.extra]\nhost = "evil.example.net"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert [p.pointer for p in caught.value.problems] == ["/routing/smarthost/extra/host"]


def test_invalid_secrets_toml_reports_the_line_without_echoing_it(tmp_path: Path) -> None:
    config_path, secrets_path = _rendered(tmp_path)
    secrets_path.write_text('[routing.smarthost.auth]\npassword = "pw-\x01bad"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert caught.value.unreadable
    assert "line 2" in str(caught.value)
    assert "pw-" not in str(caught.value) and "\x01" not in str(caught.value)


def test_invalid_config_toml_reports_file_and_line(tmp_path: Path) -> None:
    config_path, _ = _rendered(tmp_path)
    config_path.write_text("version = 1\n[host\nname = 'x'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert caught.value.unreadable
    assert str(config_path) in str(caught.value) and "line 2" in str(caught.value)

