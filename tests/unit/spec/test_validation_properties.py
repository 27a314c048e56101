"""Properties of the validator on arbitrary input: it only ever answers with Problems."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deliverd.spec.problems import Problem, Severity
from deliverd.spec.validation import MIN_GUARDED_SECRET, validate_spec

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PASSWORDS = ["Pw-Global-x91", "Pw-Pop-y27", "Pw-Alice-z55", "Pw-Mail-q08"]

# A valid spec using every section, with a password in every secret field.
FULL: dict[str, Any] = {
    "version": 1,
    "host": {"name": "mail.example.com", "addresses": ["192.0.2.10", "2001:db8::10"]},
    "listen": [
        {"address": "127.0.0.1", "port": 2525},
        {"address": "192.0.2.10", "port": 2526, "allow_networks": ["192.0.2.0/26"]},
    ],
    "queue": {"path": "/var/spool/deliverd"},
    "routing": {
        "mode": "direct_then_smarthost",
        "direct": {"port": 25, "bounce_on_no_mx": False, "bounce_on_mx_5xx": True},
        "smarthost": {
            "host": "relay.example.net",
            "port": 587,
            "tls": "starttls",
            "verify_tls": True,
            "ca_file": "/etc/ssl/relay.pem",
            "auth": {"username": "app01", "password": PASSWORDS[0]},
            "pop_before_smtp": {
                "host": "pop.example.net",
                "username": "popper",
                "password": PASSWORDS[1],
                "valid_for": "5m",
            },
            "per_account_auth": True,
            "bounce_on_5xx": False,
        },
        "abort_on_rcpt_5xx": False,
    },
    "accounts": [
        {
            "address": "alice@example.com",
            "smarthost_auth": {"username": "alice", "password": PASSWORDS[2]},
            "mail_password": PASSWORDS[3],
        }
    ],
    "retry": {"temp_error_delay": "3m", "interval": "15m", "max_interval": "4h",
              "expire_after": "2d", "on_expiry": "hold"},
    "dsn": {"notify_delayed": True, "postmaster": "postmaster@example.com"},
    "limits": {"max_sessions": 30, "per_destination": 10, "max_message_size": "50MB"},
    "timeouts": {"connect": "30s", "dns": "10s"},
    "dns": {"nameservers": ["127.0.0.1:5353", "[::1]:53"]},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, sub in value.items():
            found.extend(_paths(sub, (*prefix, key)))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            found.extend(_paths(sub, (*prefix, index)))
    return found


FULL_PATHS = _paths(FULL)[1:]


def _resolves(doc: object, ptr: str) -> bool:
    if ptr == "":
        return True
    node = doc
    for raw in ptr[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _parent(ptr: str) -> str:
    return ptr.rpartition("/")[0]


def _assert_well_formed(spec: object, problems: list[Problem]) -> None:
    assert isinstance(problems, list)
    for problem in problems:
        assert isinstance(problem, Problem)
        assert isinstance(problem.severity, Severity)
        assert problem.message, problem
        # A missing field (required, or a default that clashes) is named by the pointer it
        # should have: its parent exists.
        assert _resolves(spec, problem.pointer) or _resolves(spec, _parent(problem.pointer)), (
            problem
        )


def _assert_no_secret(problems: list[Problem], secrets: list[str]) -> None:
    for problem in problems:
        for secret in secrets:
            if len(secret) >= MIN_GUARDED_SECRET:
                assert secret not in problem.message, (secret, problem)
                assert secret not in problem.hint, (secret, problem)


def test_the_full_spec_used_below_is_valid() -> None:
    assert [p for p in validate_spec(FULL) if p.severity is Severity.ERROR] == []


@FAST
@given(json_values)
def test_any_json_value_gets_problems_never_an_exception(spec: object) -> None:
    problems = validate_spec(spec)

    _assert_well_formed(spec, problems)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(FULL)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FULL_PATHS))
        parent: Any = spec
        for part in path[:-1]:
            if not isinstance(parent, dict | list):
                break
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if not isinstance(parent, dict | list):
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif action == "add" and isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
            elif isinstance(parent, dict) or (
                isinstance(path[-1], int) and path[-1] < len(parent)
            ):
                parent[path[-1]] = draw(json_values)  # type: ignore[index]
    return spec


@FAST
@given(mutated_specs())
def test_mutated_valid_spec_gets_problems_with_resolvable_pointers(spec: dict[str, Any]) -> None:
    problems = validate_spec(spec)

    _assert_well_formed(spec, problems)
    _assert_no_secret(problems, PASSWORDS)


secret_text = st.text(min_size=MIN_GUARDED_SECRET, max_size=16).filter(lambda s: s.strip())


@FAST
@given(
    secret=secret_text,
    target=st.sampled_from(FULL_PATHS),
    mistakes=mutated_specs(),
)
def test_a_password_never_appears_in_messages_wherever_else_it_is_pasted(
    secret: str, target: tuple[str | int, ...], mistakes: dict[str, Any]
) -> None:
    spec = copy.deepcopy(mistakes)
    routing = spec.get("routing")
    smarthost = routing.get("smarthost") if isinstance(routing, dict) else None
    if isinstance(smarthost, dict) and isinstance(smarthost.get("auth"), dict):
        smarthost["auth"]["password"] = secret
    else:
        spec["routing"] = {"smarthost": {"host": "relay.example.net",
                                         "auth": {"username": "u", "password": secret}}}
    _set(spec, target, secret)

    problems = validate_spec(spec)

    _assert_well_formed(spec, problems)
    _assert_no_secret(problems, [secret])


def _set(doc: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = doc
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict) or (
        isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node)
    ):
        node[path[-1]] = value
