"""The spec validator: one row per rule, each proving the exact pointer and the message."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deliverd.spec.normalise import normalise
from deliverd.spec.problems import Severity, errors, warnings
from deliverd.spec.specfile import load_spec_file
from deliverd.spec.validation import (
    REDACTED,
    check_spec,
    collect_secrets,
    redact_secrets,
    validate_spec,
)
from tests.fixtures import paths

EXAMPLES = paths.EXAMPLES

DELETE = object()

MINIMAL: dict[str, Any] = {"version": 1, "host": {"name": "mail.example.com"}}

SMARTHOST: dict[str, Any] = {
    "version": 1,
    "host": {"name": "mail.example.com", "addresses": ["192.0.2.10", "2001:db8::10"]},
    "routing": {
        "mode": "smarthost",
        "smarthost": {
            "host": "relay.example.net",
            "port": 587,
            "tls": "starttls",
            "auth": {"username": "app01", "password": "Smarthost-Pw-1"},
        },
    },
}

POP = {"host": "pop.example.net", "username": "popuser", "password": "Pop-Pw-2"}
ACCOUNT_AUTH = {"username": "alice", "password": "Alice-Pw-3"}


def patched(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``patch`` merged in (``DELETE`` removes a key)."""
    result = copy.deepcopy(base)
    _merge(result, patch)
    return result


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is DELETE:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def sh(**fields: Any) -> dict[str, Any]:
    """A patch of routing.smarthost."""
    return {"routing": {"smarthost": fields}}


def direct_with_smarthost(**fields: Any) -> dict[str, Any]:
    return {"routing": {"mode": "direct_then_smarthost", "smarthost": fields}}


# (base, patch, pointer, message fragment): each spec has exactly one error.
INVALID = [
    # unknown keys at several levels
    pytest.param(MINIMAL, {"extra": 1}, "/extra", "unknown key", id="unknown-top-level-key"),
    pytest.param(MINIMAL, {"host": {"nmae": "x"}}, "/host/nmae", "unknown key",
                 id="unknown-host-key"),
    pytest.param(SMARTHOST, sh(pasword="x"), "/routing/smarthost/pasword", "unknown key",
                 id="unknown-smarthost-key"),
    pytest.param(MINIMAL, {"listen": [{"address": "127.0.0.1", "bind": "x"}]}, "/listen/0/bind",
                 "unknown key", id="unknown-listener-key"),
    pytest.param(SMARTHOST, sh(auth={"username": "a", "password": "Pw-123456", "pass": "x"}),
                 "/routing/smarthost/auth/pass", "unknown key", id="unknown-credentials-key"),
    pytest.param(MINIMAL, {"accounts": [{"address": "a@example.com", "login": "a"}]},
                 "/accounts/0/login", "unknown key", id="unknown-account-key"),
    pytest.param(MINIMAL, {"retry": {"intervall": "5m"}}, "/retry/intervall", "unknown key",
                 id="unknown-retry-key"),
    # version and required fields
    pytest.param(MINIMAL, {"version": 2}, "/version", "must be 1", id="version-2"),
    pytest.param(MINIMAL, {"version": "1"}, "/version", "must be 1", id="version-string"),
    pytest.param(MINIMAL, {"version": DELETE}, "/version", "is required", id="version-missing"),
    pytest.param(MINIMAL, {"host": DELETE}, "/host", "is required", id="host-missing"),
    pytest.param(MINIMAL, {"host": {"name": DELETE}}, "/host/name", "is required",
                 id="host-name-missing"),
    pytest.param(SMARTHOST, sh(host=DELETE), "/routing/smarthost/host", "is required",
                 id="smarthost-host-missing"),
    pytest.param(SMARTHOST, sh(auth={"password": DELETE}), "/routing/smarthost/auth/password",
                 "is required", id="auth-password-missing"),
    pytest.param(SMARTHOST, sh(pop_before_smtp={"host": "pop.example.net", "password": "Pw-4444"}),
                 "/routing/smarthost/pop_before_smtp/username", "is required",
                 id="pop-username-missing"),
    pytest.param(MINIMAL, {"accounts": [{"mail_password": "Pw-55555"}]}, "/accounts/0/address",
                 "is required", id="account-address-missing"),
    pytest.param(MINIMAL, {"listen": [{"port": 2525}]}, "/listen/0/address", "is required",
                 id="listener-address-missing"),
    # types
    pytest.param(SMARTHOST, sh(port="587"), "/routing/smarthost/port",
                 "must be a whole number, not a string", id="port-as-string"),
    pytest.param(SMARTHOST, sh(port=587.0), "/routing/smarthost/port",
                 "not a decimal number", id="port-as-float"),
    pytest.param(SMARTHOST, sh(verify_tls="yes"), "/routing/smarthost/verify_tls",
                 "must be true or false, not a string", id="boolean-as-string"),
    pytest.param(MINIMAL, {"routing": "direct"}, "/routing", "must be a mapping, not a string",
                 id="routing-as-string"),
    pytest.param(MINIMAL, {"accounts": {"address": "a@example.com"}}, "/accounts",
                 "must be a list, not a mapping", id="accounts-as-mapping"),
    pytest.param(MINIMAL, {"timeouts": {"connect": 30}}, "/timeouts/connect",
                 "must be a string, not a whole number", id="duration-as-number"),
    pytest.param(MINIMAL, {"limits": {"max_sessions": True}}, "/limits/max_sessions",
                 "not a boolean", id="limit-as-boolean"),
    # ranges
    pytest.param(SMARTHOST, sh(port=70000), "/routing/smarthost/port",
                 "70000 is greater than the maximum of 65535", id="port-too-high"),
    pytest.param(MINIMAL, {"listen": [{"address": "127.0.0.1", "port": 0}]}, "/listen/0/port",
                 "0 is less than the minimum of 1", id="port-zero"),
    pytest.param(MINIMAL, {"limits": {"max_sessions": 0}}, "/limits/max_sessions",
                 "less than the minimum of 1", id="max-sessions-zero"),
    pytest.param(MINIMAL, {"limits": {"max_hops": 5000}}, "/limits/max_hops",
                 "greater than the maximum of 1000", id="max-hops-too-high"),
    # enums
    pytest.param(MINIMAL, {"routing": {"mode": "smarthst"}}, "/routing/mode",
                 "must be one of: direct, smarthost, direct_then_smarthost", id="mode-unknown"),
    pytest.param(SMARTHOST, sh(tls="ssl"), "/routing/smarthost/tls",
                 "must be one of: starttls, tls, opportunistic, none", id="tls-unknown"),
    pytest.param(MINIMAL, {"retry": {"on_expiry": "drop"}}, "/retry/on_expiry",
                 "must be one of: bounce, hold", id="on-expiry-unknown"),
    # patterns: durations, sizes, names, addresses, paths
    pytest.param(MINIMAL, {"retry": {"interval": "15 minutes"}}, "/retry/interval",
                 "'15 minutes' is not a duration", id="duration-words"),
    pytest.param(MINIMAL, {"timeouts": {"dns": "-5s"}}, "/timeouts/dns", "is not a duration",
                 id="duration-negative"),
    pytest.param(MINIMAL, {"timeouts": {"dns": "1h30m"}}, "/timeouts/dns", "is not a duration",
                 id="duration-two-units"),
    pytest.param(MINIMAL, {"limits": {"max_message_size": "50 MB"}}, "/limits/max_message_size",
                 "is not a size", id="size-with-space"),
    pytest.param(MINIMAL, {"limits": {"max_message_size": "50M"}}, "/limits/max_message_size",
                 "is not a size", id="size-bad-unit"),
    pytest.param(SMARTHOST, sh(host="[192.0.2.1]"), "/routing/smarthost/host",
                 "is not a host name or IP address", id="smarthost-in-brackets"),
    pytest.param(SMARTHOST, sh(host="relay.example.net:587"), "/routing/smarthost/host",
                 "is not a host name or IP address", id="smarthost-with-port"),
    pytest.param(SMARTHOST, sh(host="cafe.de:25"), "/routing/smarthost/host",
                 "is not an IPv6 address", id="smarthost-hex-name-with-port"),
    pytest.param(SMARTHOST, sh(host="192.0.2.300"), "/routing/smarthost/host",
                 "is not an IPv4 address", id="smarthost-bad-ipv4"),
    pytest.param(MINIMAL, {"host": {"name": "mail example.com"}}, "/host/name",
                 "is not a host name", id="host-name-with-space"),
    pytest.param(MINIMAL, {"host": {"name": "mail.example.com\n"}}, "/host/name", "line break",
                 id="host-name-with-newline"),
    pytest.param(MINIMAL, {"host": {"addresses": ["192.0.2.300"]}}, "/host/addresses/0",
                 "is not an IP address", id="host-address-bad-ipv4"),
    pytest.param(MINIMAL, {"host": {"addresses": ["192.0.2.1", "192.0.2.1"]}},
                 "/host/addresses/1", "repeats entry 0", id="host-address-duplicate"),
    pytest.param(MINIMAL, {"listen": [{"address": "localhost"}]}, "/listen/0/address",
                 "is not an IP address", id="listener-address-name"),
    pytest.param(MINIMAL, {"listen": []}, "/listen", "must not be empty", id="no-listener"),
    pytest.param(MINIMAL,
                 {"listen": [{"address": "192.0.2.10", "allow_networks": ["192.0.2.0/33"]}]},
                 "/listen/0/allow_networks/0", "is not a network", id="cidr-prefix-too-long"),
    pytest.param(MINIMAL,
                 {"listen": [{"address": "192.0.2.10", "allow_networks": ["192.0.2.1/24"]}]},
                 "/listen/0/allow_networks/0", "host bits set", id="cidr-host-bits"),
    pytest.param(MINIMAL, {"dns": {"nameservers": ["ns1.example.com"]}}, "/dns/nameservers/0",
                 "is not a nameserver address", id="nameserver-name"),
    pytest.param(MINIMAL, {"dns": {"nameservers": ["127.0.0.1:70000"]}}, "/dns/nameservers/0",
                 "port outside 1..65535", id="nameserver-port-too-high"),
    pytest.param(MINIMAL, {"dns": {"nameservers": ["[::1]:0"]}}, "/dns/nameservers/0",
                 "port outside 1..65535", id="nameserver-v6-port-zero"),
    pytest.param(MINIMAL, {"dns": {"nameservers": ["abc"]}}, "/dns/nameservers/0",
                 "is not an IP address", id="nameserver-hex-word"),
    pytest.param(MINIMAL, {"queue": {"path": "spool/deliverd"}}, "/queue/path",
                 "is not a valid path", id="queue-path-relative"),
    pytest.param(MINIMAL, {"accounts": [{"address": "nobody"}]}, "/accounts/0/address",
                 "is not an email address", id="account-address-not-email"),
    pytest.param(SMARTHOST, sh(auth={"username": "app 01", "password": "Pw-66666"}),
                 "/routing/smarthost/auth/username", "is not a valid username",
                 id="username-with-space"),
    pytest.param(SMARTHOST, sh(auth={"username": "app01", "password": ""}),
                 "/routing/smarthost/auth/password", "must not be empty", id="password-empty"),
    # semantic rules
    pytest.param(MINIMAL, {"routing": {"mode": "smarthost"}}, "/routing/smarthost",
                 "is required when routing.mode is smarthost", id="smarthost-mode-needs-host"),
    pytest.param(MINIMAL, {"routing": {"mode": "direct_then_smarthost"}}, "/routing/smarthost",
                 "is required when routing.mode is direct_then_smarthost",
                 id="fallback-mode-needs-host"),
    pytest.param(SMARTHOST, sh(tls="none"), "/routing/smarthost/tls",
                 "tls: none sends smart host passwords without encryption",
                 id="auth-without-tls"),
    pytest.param(SMARTHOST, sh(tls="opportunistic"), "/routing/smarthost/tls",
                 "whenever the smart host does not offer STARTTLS", id="auth-opportunistic-tls"),
    pytest.param(
        MINIMAL,
        {
            **direct_with_smarthost(host="relay.example.net", per_account_auth=True),
            "accounts": [{"address": "alice@example.com", "smarthost_auth": ACCOUNT_AUTH}],
        },
        "/routing/smarthost/tls",
        "the default tls (opportunistic)",
        id="per-account-auth-default-tls",
    ),
    pytest.param(SMARTHOST, sh(pop_before_smtp={**POP, "tls": "none"}),
                 "/routing/smarthost/pop_before_smtp/tls",
                 "tls: none sends the POP3 password without encryption", id="pop-without-tls"),
    pytest.param(MINIMAL, {"listen": [{"address": "0.0.0.0"}]}, "/listen/0/allow_networks",
                 "0.0.0.0 is not a loopback address", id="public-listener-without-networks"),
    pytest.param(MINIMAL, {"listen": [{"address": "127.0.0.1"}, {"address": "::"}]},
                 "/listen/1/allow_networks", "is not a loopback address",
                 id="second-listener-without-networks"),
    pytest.param(MINIMAL,
                 {"listen": [{"address": "192.0.2.10", "allow_networks": ["0.0.0.0/0"]}]},
                 "/listen/0/allow_networks/0", "open relay", id="listener-open-relay-v4"),
    pytest.param(MINIMAL,
                 {"listen": [{"address": "::1", "allow_networks": ["2001:db8::/32", "::/0"]}]},
                 "/listen/0/allow_networks/1", "open relay", id="listener-open-relay-v6"),
    pytest.param(MINIMAL, {"metrics": {"listen": "192.0.2.10:9154"}},
                 "/metrics/allow_networks", "192.0.2.10 is not a loopback address",
                 id="public-metrics-without-networks"),
    pytest.param(MINIMAL, {"metrics": {"listen": "[2001:db8::1]:9154",
                                       "allow_networks": ["::/0"]}},
                 "/metrics/allow_networks/0", "lets every address read the metrics",
                 id="metrics-open-to-all"),
    pytest.param(MINIMAL, {"metrics": {"listen": "127.0.0.1:70000"}}, "/metrics/listen",
                 "has a port outside 1..65535", id="metrics-port-too-large"),
    pytest.param(MINIMAL, {"metrics": {"listen": "127.0.0.300:9154"}}, "/metrics/listen",
                 "is not an IP address and port", id="metrics-bad-address"),
    pytest.param(MINIMAL, {"metrics": {"listen": "localhost:9154"}}, "/metrics/listen",
                 "", id="metrics-host-name"),
    pytest.param(SMARTHOST, sh(host="MAIL.example.com."), "/routing/smarthost/host",
                 "is this host itself", id="smarthost-is-host-name"),
    pytest.param(SMARTHOST, sh(host="192.0.2.10"), "/routing/smarthost/host",
                 "is one of this host's own addresses", id="smarthost-is-own-ipv4"),
    pytest.param(SMARTHOST, sh(host="2001:DB8:0::10"), "/routing/smarthost/host",
                 "is one of this host's own addresses", id="smarthost-is-own-ipv6"),
    pytest.param(MINIMAL, {"retry": {"interval": "6h"}}, "/retry/interval",
                 "6h is longer than retry.max_interval (4h)", id="interval-above-max"),
    pytest.param(MINIMAL, {"retry": {"max_interval": "10m"}}, "/retry/max_interval",
                 "10m is shorter than retry.interval (15m)", id="max-interval-below-default"),
    pytest.param(MINIMAL, {"retry": {"temp_error_delay": "3d"}}, "/retry/temp_error_delay",
                 "3d is longer than retry.expire_after (2d)", id="temp-delay-above-expiry"),
    pytest.param(MINIMAL, {"retry": {"interval": "1d", "max_interval": "1d",
                                     "expire_after": "24h"}},
                 "/retry/interval", "is not shorter than retry.expire_after",
                 id="interval-equals-expiry"),
    pytest.param(MINIMAL, {"retry": {"expire_after": "10m"}}, "/retry/expire_after",
                 "10m is not longer than retry.interval (15m)", id="expiry-below-default-interval"),
    pytest.param(MINIMAL, {"accounts": [{"address": "alice@example.com"},
                                        {"address": "Alice@Example.com"}]},
                 "/accounts/1/address", "repeats accounts[0].address", id="duplicate-account"),
    pytest.param(MINIMAL, {"limits": {"max_sessions": 5}}, "/limits/per_destination",
                 "10 is more than limits.max_sessions (5)", id="per-destination-above-max"),
]

LIST = [{"host": "relay1.example.net", "port": 587}, {"host": "relay2.example.net"}]
ROUTE = {"name": "billing", "match": {"sender_domain": ["billing.example.com"]},
         "smarthost": {"host": "provider.example.net", "port": 587,
                       "auth": {"username": "billing", "password": "Route-Pw-7"}}}
INVALID += [
    pytest.param(MINIMAL, {"routes": [ROUTE, {**ROUTE, "match": {"sender": ["a@b.example"]}}]},
                 "/routes/1/name", "repeats routes[0].name", id="route-duplicate-name"),
    pytest.param(MINIMAL, {"routes": [{"name": "r", "match": {"recipient_domain": ["x.example"]},
                                       "mode": "smarthost"}]},
                 "/routes/0/smarthost", "is required when the route's mode is smarthost",
                 id="route-smarthost-mode-without-smarthost"),
    pytest.param(MINIMAL, {"routes": [{"name": "r", "match": {}}]}, "/routes/0/match",
                 "", id="route-empty-match"),
    pytest.param(MINIMAL, {"routes": [{"name": "Billing App", "match": {"sender": ["a@b.c"]}}]},
                 "/routes/0/name", "", id="route-name-not-a-slug"),
    pytest.param(MINIMAL, {"routes": [{**ROUTE, "smarthost": {**ROUTE["smarthost"],
                                                              "tls": "none"}}]},
                 "/routes/0/smarthost/tls", "sends smart host passwords without encryption",
                 id="route-smarthost-plaintext-auth"),
    pytest.param(SMARTHOST, {"routes": [{**ROUTE, "smarthost": {"host": "192.0.2.10"}}]},
                 "/routes/0/smarthost/host", "is one of this host's own addresses",
                 id="route-smarthost-is-self"),
    pytest.param(MINIMAL, {"routes": [{**ROUTE, "smarthost": {"port": 587}}]},
                 "/routes/0/smarthost/host", "is required", id="route-smarthost-without-host"),
    pytest.param(SMARTHOST, sh(hosts=LIST), "/routing/smarthost/hosts",
                 "cannot be set together with host", id="smarthost-host-and-hosts"),
    pytest.param(SMARTHOST, sh(host=DELETE, port=DELETE, hosts=[]), "/routing/smarthost/hosts",
                 "must not be empty", id="smarthost-hosts-empty"),
    pytest.param(SMARTHOST, sh(host=DELETE, port=DELETE, hosts=[{"port": 587}]),
                 "/routing/smarthost/hosts/0/host", "required", id="smarthost-hosts-entry-no-host"),
    pytest.param(SMARTHOST, sh(host=DELETE, port=DELETE,
                               hosts=[LIST[0], {"host": "mail.example.com"}]),
                 "/routing/smarthost/hosts/1/host", "is this host itself",
                 id="smarthost-hosts-entry-is-self"),
    pytest.param(SMARTHOST, sh(host=DELETE, port=DELETE, hosts=[{"host": "r.example.net",
                                                                 "prt": 25}]),
                 "/routing/smarthost/hosts/0/prt", "", id="smarthost-hosts-entry-unknown-key"),
]


DKIM = {"domain": "example.com", "selector": "rsa2026", "key_file": "/etc/deliverd/dkim/r.key"}
INVALID += [
    pytest.param(MINIMAL, {"dkim": [DKIM, {**DKIM, "domain": "Example.COM.",
                                           "key_file": "/etc/deliverd/dkim/r2.key"}]},
                 "/dkim/1/selector", "is already used for", id="dkim-duplicate-selector"),
    pytest.param(MINIMAL, {"dkim": [{**DKIM, "key_file": "dkim/r.key"}]}, "/dkim/0/key_file",
                 "", id="dkim-relative-key-file"),
    pytest.param(MINIMAL, {"dkim": [{**DKIM, "algorithm": "rsa-sha1"}]}, "/dkim/0/algorithm",
                 "", id="dkim-unknown-algorithm"),
    pytest.param(MINIMAL, {"dkim": [{**DKIM, "headers": ["Subject"]}]}, "/dkim/0/headers",
                 "must include From", id="dkim-headers-without-from"),
    pytest.param(MINIMAL, {"dkim": [{**DKIM, "headers": ["From", "Received"]}]},
                 "/dkim/0/headers/1", "is added after signing", id="dkim-signs-a-trace-field"),
    pytest.param(MINIMAL, {"dkim": [{"domain": "example.com", "key_file": "/k"}]},
                 "/dkim/0/selector", "required", id="dkim-without-selector"),
]


def test_dkim_entries_get_their_defaults_and_both_algorithms_of_one_domain_are_valid() -> None:
    spec = patched(MINIMAL, {"dkim": [DKIM, {**DKIM, "selector": "ed2026",
                                             "algorithm": "ed25519-sha256"}]})
    assert validate_spec(spec) == []
    normalised = normalise(spec)
    assert normalised["dkim"][0]["algorithm"] == "rsa-sha256"
    assert normalised["dkim"][0]["headers"][:6] == ["From", "To", "Cc", "Subject", "Date",
                                                     "Message-ID"]
    assert normalise(MINIMAL)["dkim"] == []


@pytest.mark.parametrize(("base", "patch", "where", "fragment"), INVALID)
def test_invalid_spec_reports_one_error_at_the_offending_field(
    base: dict[str, Any], patch: dict[str, Any], where: str, fragment: str
) -> None:
    problems = validate_spec(patched(base, patch))

    found = errors(problems)
    assert [p.pointer for p in found] == [where], [p.render() for p in found]
    assert fragment in found[0].message
    assert found[0].hint, "every error carries a hint"


def test_table_covers_at_least_45_invalid_specs() -> None:
    assert len(INVALID) >= 45


# (base, patch, pointer, message fragment): valid specs with this one warning.
WARNINGS = [
    pytest.param(MINIMAL, {"routing": {"mode": "direct", "smarthost": {"host": "r.example.net"}}},
                 "/routing/smarthost", "is ignored: routing.mode is direct",
                 id="smarthost-in-direct-mode"),
    pytest.param(SMARTHOST, sh(tls="none", allow_plaintext_auth=True),
                 "/routing/smarthost/allow_plaintext_auth", "may cross the network in clear",
                 id="plaintext-auth-allowed"),
    pytest.param(SMARTHOST, sh(tls="opportunistic", allow_plaintext_auth=True),
                 "/routing/smarthost/allow_plaintext_auth", "(tls: opportunistic)",
                 id="opportunistic-auth-allowed"),
    pytest.param(SMARTHOST, sh(allow_plaintext_auth=True, pop_before_smtp={**POP, "tls": "none"}),
                 "/routing/smarthost/pop_before_smtp/tls", "POP3 password crosses the network",
                 id="plaintext-pop-allowed"),
    pytest.param(SMARTHOST, sh(verify_tls=False), "/routing/smarthost/verify_tls",
                 "certificate is not verified", id="unverified-tls-with-auth"),
    pytest.param(SMARTHOST, sh(auth=DELETE, verify_tls=False, pop_before_smtp=POP),
                 "/routing/smarthost/verify_tls", "certificate is not verified",
                 id="unverified-tls-with-pop"),
    pytest.param(patched(SMARTHOST, sh(auth=DELETE, tls=DELETE)),
                 sh(verify_tls=False, ca_file="/etc/ssl/relay-ca.pem"),
                 "/routing/smarthost/ca_file", "is not used: verify_tls is false",
                 id="ca-file-without-verification"),
    pytest.param(SMARTHOST, sh(per_account_auth=True), "/routing/smarthost/per_account_auth",
                 "no account has its own credentials", id="per-account-auth-without-accounts"),
    pytest.param(SMARTHOST, {**sh(per_account_auth=True),
                             "accounts": [{"address": "a@example.com", "mail_password": "Pw-777"}]},
                 "/routing/smarthost/per_account_auth", "no account has its own credentials",
                 id="mail-password-without-use-flag"),
    pytest.param(SMARTHOST, {**sh(per_account_auth=True, use_account_mail_passwords=True),
                             "accounts": [{"address": "a@example.com", "mail_password": "Pw-777"}]},
                 "/routing/smarthost/use_account_mail_passwords",
                 "hands local mail passwords to the smart host", id="account-mail-passwords"),
    pytest.param(SMARTHOST, sh(use_account_mail_passwords=True),
                 "/routing/smarthost/use_account_mail_passwords",
                 "does nothing while per_account_auth is false",
                 id="mail-passwords-without-per-account"),
    pytest.param(SMARTHOST, sh(tls="tls", port=587), "/routing/smarthost/port",
                 "port 587 normally speaks STARTTLS", id="implicit-tls-on-587"),
    pytest.param(SMARTHOST, sh(tls="tls", port=DELETE), "/routing/smarthost/port",
                 "port 25 normally speaks STARTTLS", id="implicit-tls-on-default-port"),
    pytest.param(SMARTHOST, sh(tls=DELETE, port=465), "/routing/smarthost/tls",
                 "port 465 normally expects implicit TLS", id="default-starttls-on-465"),
    pytest.param(MINIMAL, {"host": {"name": "mail"}}, "/host/name",
                 "is not a fully qualified domain name", id="host-name-not-fqdn"),
    pytest.param(MINIMAL, {"routes": [
                     {"name": "all", "match": {"recipient_domain": [".example"]}},
                     {"name": "one", "match": {"recipient_domain": ["a.example"]}}]},
                 "/routes/1/match", "can never be used: routes[0] matches every message it would",
                 id="route-shadowed"),
    pytest.param(MINIMAL, {"routes": [{**ROUTE, "mode": "direct"}]}, "/routes/0/smarthost",
                 "is ignored: the route's mode is direct", id="route-direct-with-smarthost"),
    pytest.param(MINIMAL, {"routes": [{**ROUTE, "smarthost": {**ROUTE["smarthost"],
                                                              "verify_tls": False}}]},
                 "/routes/0/smarthost/verify_tls", "certificate is not verified",
                 id="route-smarthost-unverified"),
    pytest.param(SMARTHOST, sh(host=DELETE, hosts=LIST), "/routing/smarthost/port",
                 "is ignored when hosts is set", id="port-beside-hosts"),
    pytest.param(SMARTHOST, sh(host=DELETE, port=DELETE, tls="tls", hosts=LIST),
                 "/routing/smarthost/hosts/1/port", "port 25 normally speaks STARTTLS",
                 id="implicit-tls-on-a-list-entry-default-port"),
]


def test_a_failover_list_instead_of_host_is_valid_and_normalised() -> None:
    spec = patched(SMARTHOST, sh(host=DELETE, port=DELETE, hosts=LIST))
    normal, problems = check_spec(spec)
    assert problems == [], [p.render() for p in problems]
    assert normal is not None
    assert normal["routing"]["smarthost"]["hosts"] == [
        {"host": "relay1.example.net", "port": 587}, {"host": "relay2.example.net", "port": 25}]


def test_a_smart_host_with_neither_host_nor_hosts_names_both_in_the_error() -> None:
    found = errors(validate_spec(patched(SMARTHOST, sh(host=DELETE))))
    assert [p.pointer for p in found] == ["/routing/smarthost/host"]
    assert "hosts" in found[0].message and "hosts" in found[0].hint


@pytest.mark.parametrize(("base", "patch", "where", "fragment"), WARNINGS)
def test_questionable_but_valid_spec_warns_at_the_field(
    base: dict[str, Any], patch: dict[str, Any], where: str, fragment: str
) -> None:
    problems = validate_spec(patched(base, patch))

    assert errors(problems) == [], [p.render() for p in problems]
    matching = [p for p in problems if p.pointer == where and fragment in p.message]
    assert matching, [p.render() for p in problems]
    assert all(p.severity is Severity.WARNING for p in matching)
    assert all(p.hint for p in matching)


def test_use_account_mail_passwords_without_per_account_gives_two_warnings() -> None:
    problems = validate_spec(patched(SMARTHOST, sh(use_account_mail_passwords=True)))

    at_flag = [p for p in problems if p.pointer == "/routing/smarthost/use_account_mail_passwords"]
    assert len(at_flag) == 2
    assert {p.severity for p in at_flag} == {Severity.WARNING}


def test_clean_specs_have_no_problems_at_all() -> None:
    assert validate_spec(MINIMAL) == []
    assert validate_spec(SMARTHOST) == []


def test_spec_that_is_not_a_mapping_is_one_error_at_the_root() -> None:
    for spec in (None, [], "version: 1", 1):
        problems = validate_spec(spec)
        assert [(p.pointer, p.severity) for p in problems] == [("", Severity.ERROR)]
        assert "the spec must be a mapping" in problems[0].message


def test_unknown_key_hint_suggests_the_close_key() -> None:
    [problem] = validate_spec(patched(MINIMAL, {"host": {"nmae": "x"}}))

    assert problem.hint == "did you mean 'name'?"


def test_unknown_key_hint_lists_allowed_keys_when_nothing_is_close() -> None:
    [problem] = validate_spec(patched(MINIMAL, {"queue": {"zzz": 1}}))

    assert problem.hint == "allowed keys: path"


def test_enum_hint_suggests_the_close_value() -> None:
    [problem] = validate_spec(patched(MINIMAL, {"routing": {"mode": "smarthst"}}))

    assert problem.hint == "did you mean 'smarthost'?"


def test_hints_come_from_the_schema_x_hint() -> None:
    spec = patched(MINIMAL, {"retry": {"interval": "15 minutes"}, "version": 3})
    hints = {p.pointer: p.hint for p in validate_spec(spec)}

    assert hints["/retry/interval"].startswith("write a whole number and one unit")
    assert hints["/version"] == "set version: 1"


def test_required_hint_describes_the_missing_field() -> None:
    [problem] = validate_spec(patched(SMARTHOST, sh(host=DELETE)))

    assert "host name or an IP address" in problem.hint


def test_all_mistakes_are_reported_at_once_sorted_by_pointer() -> None:
    listeners = [{"address": f"127.0.0.{n}"} for n in range(1, 12)]
    listeners[0]["port"] = 0
    listeners[10]["port"] = 70000
    spec = patched(
        MINIMAL,
        {
            "version": 2,
            "listen": listeners,
            "retry": {"interval": "soon"},
            "dns": {"nameservers": ["bad"]},
            "limits": {"max_sessions": 0},
        },
    )
    pointers = [p.pointer for p in validate_spec(spec)]

    # Numeric parts sort as numbers: /listen/10 comes after /listen/0, not before /listen/2.
    assert pointers == [
        "/dns/nameservers/0",
        "/limits/max_sessions",
        "/listen/0/port",
        "/listen/10/port",
        "/retry/interval",
        "/version",
    ]


def test_a_field_the_schema_rejected_is_not_judged_again_by_the_rules() -> None:
    # A bad duration must not also trip the retry ordering rule, nor a bad mode the smart host
    # rule, nor a bad listener address the loopback rule.
    spec = patched(
        MINIMAL,
        {
            "retry": {"interval": "forever", "max_interval": "1m"},
            "listen": [{"address": "not-an-ip"}],
            "limits": {"max_sessions": "five"},
        },
    )
    pointers = sorted(p.pointer for p in validate_spec(spec))

    assert pointers == ["/limits/max_sessions", "/listen/0/address", "/retry/interval"]


def test_a_broken_smart_host_field_does_not_hide_the_other_rules() -> None:
    spec = patched(SMARTHOST, sh(port="587", tls="none"))
    pointers = [p.pointer for p in errors(validate_spec(spec))]

    assert pointers == ["/routing/smarthost/port", "/routing/smarthost/tls"]


# --- secrets ------------------------------------------------------------------------------------

SECRETS = ["Smarthost-Pw-1", "Pop-Pw-2", "Alice-Pw-3", "Mail-Pw-4", "Typo-Pw-5", "Wrong-Pw-6"]


def spec_full_of_mistakes_next_to_passwords() -> dict[str, Any]:
    return patched(
        SMARTHOST,
        {
            "version": 7,
            "routing": {
                "mode": "smarthostt",
                "smarthost": {
                    "tls": "none",
                    "port": "submission",
                    "auth": {"username": "a b", "password": SECRETS[0], "pasword": SECRETS[4]},
                    "pop_before_smtp": {"host": "[pop]", "username": "p", "password": SECRETS[1],
                                        "tls": "none"},
                    "per_account_auth": True,
                },
            },
            "accounts": [
                {"address": "alice", "smarthost_auth": {"username": "alice",
                                                        "password": SECRETS[2]}},
                {"address": "bob@example.com", "mail_password": SECRETS[3] + "\n"},
                {"address": "carol@example.com", "mail_password": 123456789},
                {"address": "dave@example.com", "smarthost_auth": SECRETS[5]},
            ],
            # A password pasted into a field whose error message shows the value.
            "queue": {"path": SECRETS[0]},
            "dns": {"nameservers": [SECRETS[1]]},
            "host": {"name": SECRETS[2]},
            "extra": {"password": SECRETS[3]},
        },
    )


def test_no_password_appears_in_any_message_or_hint() -> None:
    spec = spec_full_of_mistakes_next_to_passwords()
    problems = validate_spec(spec)

    assert len(errors(problems)) >= 10
    for problem in problems:
        text = problem.render()
        for secret in [*SECRETS, "123456789"]:
            assert secret not in text, text


def test_a_password_pasted_into_a_shown_field_is_redacted_not_dropped() -> None:
    problems = validate_spec(patched(SMARTHOST, {"queue": {"path": "Smarthost-Pw-1"}}))

    [problem] = [p for p in problems if p.pointer == "/queue/path"]
    assert problem.message == f"'{REDACTED}' is not a valid path"


def test_collect_secrets_finds_schema_secrets_and_misplaced_passwords() -> None:
    found = collect_secrets(spec_full_of_mistakes_next_to_passwords())

    assert {*SECRETS, "123456789"} <= {s.strip() for s in found}
    assert "alice" not in found


def test_redact_secrets_replaces_every_secret_field() -> None:
    spec = patched(
        SMARTHOST,
        {
            **sh(pop_before_smtp=POP),
            "accounts": [{"address": "a@example.com", "smarthost_auth": ACCOUNT_AUTH,
                          "mail_password": "Mail-Pw-4"}],
        },
    )
    redacted: Any = redact_secrets(spec)

    assert redacted["routing"]["smarthost"]["auth"] == {"username": "app01", "password": REDACTED}
    assert redacted["routing"]["smarthost"]["pop_before_smtp"]["password"] == REDACTED
    assert redacted["accounts"][0]["smarthost_auth"]["password"] == REDACTED
    assert redacted["accounts"][0]["mail_password"] == REDACTED
    assert spec["routing"]["smarthost"]["auth"]["password"] == "Smarthost-Pw-1", "input untouched"


def test_redact_secrets_keeps_flags_named_after_passwords() -> None:
    spec = patched(SMARTHOST, sh(per_account_auth=True, use_account_mail_passwords=True))
    redacted: Any = redact_secrets(spec)

    assert redacted["routing"]["smarthost"]["use_account_mail_passwords"] is True
    assert redacted["routing"]["smarthost"]["per_account_auth"] is True


# --- check_spec and the examples ----------------------------------------------------------------


def test_check_spec_returns_the_normalised_spec_when_valid() -> None:
    normalised, problems = check_spec(patched(MINIMAL, {"host": {"name": "mail"}}))

    assert normalised is not None
    assert normalised["queue"]["path"] == "/var/spool/deliverd"
    assert normalised["dsn"]["postmaster"] == "postmaster@mail"
    assert [p.severity for p in problems] == [Severity.WARNING]


def test_check_spec_returns_no_spec_when_invalid() -> None:
    normalised, problems = check_spec(patched(MINIMAL, {"version": 2}))

    assert normalised is None
    assert [p.pointer for p in problems] == ["/version"]


@pytest.mark.parametrize("name", ["direct.yml", "smarthost.yml", "fallback.yml", "routes.yml"])
def test_example_spec_validates_without_errors(name: str) -> None:
    spec = load_spec_file(EXAMPLES / name)

    problems = validate_spec(spec)

    assert errors(problems) == [], [p.render() for p in problems]
    assert all(p.severity is Severity.WARNING for p in warnings(problems))
