"""Judge a delivery spec: every problem at once, each with a JSON pointer, a message and a hint.

Three passes, each only looking at what the previous ones accepted, so one mistake is reported
once: the JSON Schema (its errors translated into our own words, because jsonschema's messages
echo values and a value may be a password), the ``x-format`` checks that need code (IP
addresses, networks, nameservers), and the semantic rules that relate fields to each other.

Secrets never reach a message: messages are built per keyword without echoing secret fields,
and as a last guard every secret string of the input is cut out of every message and hint.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from deliverd.core.units import format_duration, parse_duration
from deliverd.spec.normalise import normalise
from deliverd.spec.problems import Problem, Severity, errors, pointer
from deliverd.spec.resources import load_schema

PathParts = tuple[str | int, ...]
SchemaNode = dict[str, Any]

REDACTED = "<redacted>"
# Shorter "secrets" would be cut out of ordinary words ("is", "port"); they are too short to
# be worth guarding and echoed values are never secret fields anyway.
MIN_GUARDED_SECRET = 4

_DEFS = "#/$defs/"
_SH: PathParts = ("routing", "smarthost")
_POP: PathParts = (*_SH, "pop_before_smtp")
_INDEX = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_NAME = re.compile(r"pass|pasw|pwd|secret|token", re.IGNORECASE)


# --- the schema, and where a field of the input sits in it -----------------------------------


def _is_integer(_checker: object, instance: object) -> bool:
    # JSON Schema counts 25.0 as an integer; a port or a limit written that way is a mistake.
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@cache
def _validator() -> Any:
    return _StrictValidator(load_schema())


def _resolve(node: Mapping[str, Any]) -> SchemaNode:
    """A schema node with its ``$ref`` target merged under the keywords written beside it."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_DEFS):
        merged = _resolve(load_schema()["$defs"][ref[len(_DEFS) :]])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return dict(node)


def _child_schema(node: SchemaNode | None, key: object) -> SchemaNode | None:
    if node is None:
        return None
    items = node.get("items")
    if isinstance(items, dict) and isinstance(key, int):
        return _resolve(items)
    sub = node.get("properties", {}).get(key) if isinstance(key, str) else None
    return _resolve(sub) if isinstance(sub, dict) else None


def field_schema(path: PathParts) -> SchemaNode | None:
    """The schema of the field at ``path`` (``$ref`` merged), or None where no field is."""
    node: SchemaNode | None = _resolve(load_schema())
    for part in path:
        node = _child_schema(node, part)
    return node


@dataclass(frozen=True)
class _Node:
    path: PathParts
    value: object
    schema: SchemaNode | None
    secret: bool


def _walk(spec: object) -> Iterator[_Node]:
    """Every value of the input with its schema; iterative so deep or cyclic input is safe."""
    seen: set[int] = set()
    stack = [_Node((), spec, _resolve(load_schema()), False)]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node.value, dict | list):
            if id(node.value) in seen:
                continue
            seen.add(id(node.value))
        children: list[tuple[str | int, object]] = []
        if isinstance(node.value, dict):
            children = [(k if isinstance(k, int) else str(k), v) for k, v in node.value.items()]
        elif isinstance(node.value, list):
            children = list(enumerate(node.value))
        for key, value in reversed(children):
            sub = _child_schema(node.schema, key)
            secret = node.secret or _is_secret_field(sub, key, value)
            stack.append(_Node((*node.path, key), value, sub, secret))


def _is_secret_field(schema: SchemaNode | None, key: str | int, value: object) -> bool:
    if schema is not None and schema.get("x-secret") is True:
        return True
    # Flags such as use_account_mail_passwords carry "pass" in their name, not a password.
    if not isinstance(key, str) or isinstance(value, bool) or value is None:
        return False
    # Misspelt or misplaced password keys are unknown to the schema and still secret.
    if _SECRET_NAME.search(key) or difflib.SequenceMatcher(None, key, "password").ratio() > 0.75:
        return True
    return "auth" in key.lower() and isinstance(value, str)


def collect_secrets(spec: object) -> frozenset[str]:
    """Every secret value of a spec (valid or not), as the text a message could echo."""
    found: set[str] = set()
    for node in _walk(spec):
        if not node.secret or isinstance(node.value, dict | list | bool) or node.value is None:
            continue
        found.add(str(node.value))
    return frozenset(found)


def redact_secrets(spec: object) -> object:
    """A copy of a spec with every ``x-secret`` value replaced by ``<redacted>``."""
    result = copy.deepcopy(spec)
    for node in _walk(result):
        if not node.secret or not node.path or isinstance(node.value, dict | list | bool):
            continue
        parent: Any = result
        try:
            for part in node.path[:-1]:
                parent = parent[part]
            parent[node.path[-1]] = REDACTED
        except (KeyError, IndexError, TypeError):
            continue  # a key that is neither text nor a number: not from YAML, not a field
    return result


# --- schema errors in our words ----------------------------------------------------------------

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}
_TYPE_HINTS = {
    "object": "write key: value pairs indented under the key",
    "array": "write a list: one '- item' per line, or [a, b]",
    "string": "write text; quote it if YAML would read it as something else",
    "integer": "write a whole number without quotes",
    "number": "write a number without quotes",
    "boolean": "write true or false without quotes",
}
_DEF_NOUNS = {
    "duration": "a duration",
    "size": "a size",
    "hostname": "a host name",
    "host_or_ip": "a host name or IP address",
    "ip": "an IP address",
    "email": "an email address",
}
_FORMAT_NOUNS = {"cidr": "a network in CIDR form", "nameserver": "a nameserver address"}


def _describe(value: object) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else _literal(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class _Failure:
    """One jsonschema error with what its translation needs."""

    error: Any
    path: PathParts
    field: SchemaNode

    @property
    def value(self) -> object:
        return self.error.instance

    @property
    def rule(self) -> Any:
        return self.error.validator_value

    @property
    def schema(self) -> SchemaNode:
        return self.error.schema if isinstance(self.error.schema, dict) else {}

    @property
    def secret(self) -> bool:
        return bool(self.field.get("x-secret") or self.schema.get("x-secret"))

    def hint(self, fallback: str = "") -> str:
        own = self.schema.get("x-hint")
        return str(own or self.field.get("x-hint") or fallback or self.field.get("description", ""))

    def problem(
        self, message: str, hint: str | None = None, at: PathParts | None = None
    ) -> Problem:
        where = self.path if at is None else at
        return Problem(pointer(*where), message, self.hint() if hint is None else hint)


def _on_type(f: _Failure) -> list[Problem]:
    names = [f.rule] if isinstance(f.rule, str) else list(f.rule)
    wanted = " or ".join(_TYPE_NAMES.get(n, n) for n in names)
    hint = f.hint(_TYPE_HINTS.get(names[0], ""))
    return [f.problem(f"must be {wanted}, not {_describe(f.value)}", hint)]


def _on_enum(f: _Failure) -> list[Problem]:
    choices = [str(c) for c in f.rule]
    hint = f.hint()
    if isinstance(f.value, str) and not f.secret:
        close = difflib.get_close_matches(f.value.lower(), choices, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
    return [f.problem("must be one of: " + ", ".join(choices), hint)]


def _on_const(f: _Failure) -> list[Problem]:
    return [f.problem(f"must be {_literal(f.rule)}")]


def _bounds_hint(f: _Failure) -> str:
    low, high = f.schema.get("minimum"), f.schema.get("maximum")
    if low is not None and high is not None:
        return f.hint(f"a whole number from {low} to {high}")
    return f.hint()


def _on_minimum(f: _Failure) -> list[Problem]:
    return [f.problem(f"{_show(f.value)} is less than the minimum of {f.rule}", _bounds_hint(f))]


def _on_maximum(f: _Failure) -> list[Problem]:
    return [f.problem(f"{_show(f.value)} is greater than the maximum of {f.rule}", _bounds_hint(f))]


def _on_exclusive_minimum(f: _Failure) -> list[Problem]:
    return [f.problem(f"must be greater than {f.rule}", _bounds_hint(f))]


def _on_exclusive_maximum(f: _Failure) -> list[Problem]:
    return [f.problem(f"must be less than {f.rule}", _bounds_hint(f))]


def _on_min_length(f: _Failure) -> list[Problem]:
    text = "must not be empty" if f.rule == 1 else f"must be at least {f.rule} characters long"
    return [f.problem(text)]


def _on_max_length(f: _Failure) -> list[Problem]:
    return [f.problem(f"must be at most {f.rule} characters long")]


@cache
def _def_by_pattern() -> dict[str, str]:
    defs: dict[str, SchemaNode] = load_schema()["$defs"]
    return {d["pattern"]: name for name, d in defs.items() if "pattern" in d}


def _noun(f: _Failure) -> str:
    name = _def_by_pattern().get(str(f.schema.get("pattern")))
    if name in _DEF_NOUNS:
        return _DEF_NOUNS[name]
    fmt = f.schema.get("x-format") or f.field.get("x-format")
    if fmt in _FORMAT_NOUNS:
        return _FORMAT_NOUNS[fmt]
    last = next((p for p in reversed(f.path) if isinstance(p, str)), "value")
    return "a valid " + last.replace("_", " ")


def _on_pattern(f: _Failure) -> list[Problem]:
    if f.secret or not isinstance(f.value, str):
        return [f.problem(f"is not {_noun(f)}")]
    return [f.problem(f"{_show(f.value)} is not {_noun(f)}")]


def _on_min_items(f: _Failure) -> list[Problem]:
    text = "must not be empty" if f.rule == 1 else f"must have at least {f.rule} entries"
    return [f.problem(text)]


def _on_max_items(f: _Failure) -> list[Problem]:
    return [f.problem(f"must have at most {f.rule} entries")]


def _on_unique_items(f: _Failure) -> list[Problem]:
    items = f.value if isinstance(f.value, list) else []
    for later, item in enumerate(items):
        earlier = next((i for i in range(later) if _same(items[i], item)), None)
        if earlier is not None:
            return [
                f.problem(
                    f"repeats entry {earlier} of the list",
                    "remove the duplicate",
                    at=(*f.path, later),
                )
            ]
    return [f.problem("has duplicate entries", "remove the duplicates")]


def _same(a: object, b: object) -> bool:
    # JSON equality: true is not 1, unlike Python's.
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _on_required(f: _Failure) -> list[Problem]:
    present = f.value if isinstance(f.value, dict) else {}
    problems = []
    for name in f.rule:
        if name in present:
            continue
        sub = _child_schema(f.field, name) or {}
        hint = str(sub.get("x-hint") or sub.get("description") or f"add {name}")
        problems.append(f.problem("is required", hint, at=(*f.path, name)))
    return problems


def _on_additional(f: _Failure) -> list[Problem]:
    if f.rule is not False or not isinstance(f.value, dict):
        return [f.problem("has a key that is not allowed here")]
    allowed = [str(k) for k in f.schema.get("properties", {})]
    problems = []
    for key in f.value:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.7)
        hint = f"did you mean {close[0]!r}?" if close else "allowed keys: " + ", ".join(allowed)
        part = key if isinstance(key, int) else str(key)
        problems.append(f.problem("unknown key", hint, at=(*f.path, part)))
    return problems


def _on_not(f: _Failure) -> list[Problem]:
    return [f.problem("is not allowed here")]


def _on_other(f: _Failure) -> list[Problem]:
    if f.error.validator is None:  # a ``false`` schema
        return [f.problem("is not allowed here")]
    return [f.problem(f"is not valid ({f.error.validator})")]


# Dispatch on the failing keyword; unknown keywords still give a pointer and a hint.
_KEYWORDS: dict[str, Callable[[_Failure], list[Problem]]] = {
    "type": _on_type,
    "enum": _on_enum,
    "const": _on_const,
    "minimum": _on_minimum,
    "maximum": _on_maximum,
    "exclusiveMinimum": _on_exclusive_minimum,
    "exclusiveMaximum": _on_exclusive_maximum,
    "minLength": _on_min_length,
    "maxLength": _on_max_length,
    "pattern": _on_pattern,
    "minItems": _on_min_items,
    "maxItems": _on_max_items,
    "uniqueItems": _on_unique_items,
    "required": _on_required,
    "additionalProperties": _on_additional,
    "not": _on_not,
}


def _translate(error: Any) -> list[Problem]:
    if error.validator in ("anyOf", "oneOf") and error.context:
        # The alternative that got furthest says more than "matches none of the options".
        return _translate(best_match(error.context))
    path: PathParts = tuple(error.absolute_path)
    failure = _Failure(error, path, field_schema(path) or {})
    return _KEYWORDS.get(str(error.validator), _on_other)(failure)


def _schema_problems(spec: object) -> list[Problem]:
    problems: list[Problem] = []
    for error in _validator().iter_errors(spec):
        problems.extend(_translate(error))
    return problems


# --- formats that need code ---------------------------------------------------------------------


def _check_ip(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return f"{_show(text)} is not an IP address"
    return None


def _check_cidr(text: str) -> str | None:
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"{_show(text)} is not a network in CIDR form"
        return f"{_show(text)} has host bits set: the network is {network}"
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
        return f"{_show(text)} is not an IP address, or ip:port"
    if port is not None and not (_INDEX.fullmatch(port) and 1 <= int(port) <= 65535):
        return f"{_show(text)} has a port outside 1..65535"
    return None


def _check_host_or_ip(text: str) -> str | None:
    # The pattern admits anything made of hex digits, dots and colons: "cafe.de:25" included.
    if ":" in text and _check_ip(text) is not None:
        return f"{_show(text)} is not an IPv6 address (write the port in 'port')"
    if re.fullmatch(r"[0-9.]+", text) and _check_ip(text) is not None:
        return f"{_show(text)} is not an IPv4 address"
    return None


_FORMATS: dict[str, Callable[[str], str | None]] = {
    "ip": _check_ip,
    "cidr": _check_cidr,
    "nameserver": _check_nameserver,
    "host_or_ip": _check_host_or_ip,
}


def _format_problems(spec: object, bad: _Taint) -> list[Problem]:
    problems = []
    for node in _walk(spec):
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


# --- semantic rules -----------------------------------------------------------------------------


class _Skip(Exception):
    """A rule reads a field the schema already rejected: that mistake is reported once."""


@dataclass(frozen=True)
class _Taint:
    """Paths with problems; a value on, above or below one of them is not to be judged again."""

    paths: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, problems: list[Problem]) -> _Taint:
        return cls(tuple(_parts(p.pointer) for p in problems if p.severity is Severity.ERROR))

    def touches(self, path: PathParts, *, below: bool = True) -> bool:
        key = tuple(str(p) for p in path)
        return any(
            key[: len(bad)] == bad or (below and bad[: len(key)] == key) for bad in self.paths
        )


def _parts(ptr: str) -> tuple[str, ...]:
    if not ptr:
        return ()
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/"))


_MISSING = object()


@dataclass(frozen=True)
class _View:
    """Read access for rules: a rejected value raises ``_Skip``, a missing one gives None."""

    spec: Mapping[str, object]
    bad: _Taint

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
                f"{_show(text)} lets every address relay: an open relay",
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
            f"{_show(name)} is not a fully qualified domain name",
            "use the name other servers know this host by, such as mail.example.com",
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
)


def _semantic_problems(spec: Mapping[str, object], bad: _Taint) -> list[Problem]:
    view = _View(spec, bad)
    problems: list[Problem] = []
    for rule in _RULES:
        try:
            problems.extend(rule(view))
        except _Skip:
            continue
    return problems


# --- putting it together ------------------------------------------------------------------------


def _guard(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    # The marker itself could contain a (strange) secret: then say nothing rather than leak.
    return "" if any(secret in text for secret in secrets) else text


def _sort_key(problem: Problem) -> tuple[tuple[tuple[int, int, str], ...], int, str]:
    parts = tuple(
        (0, int(p), "") if _INDEX.fullmatch(p) else (1, 0, p) for p in _parts(problem.pointer)
    )
    return parts, int(problem.severity is Severity.WARNING), problem.message


def validate_spec(spec: object) -> list[Problem]:
    """Every problem of a spec at once, errors and warnings, sorted by pointer."""
    if not isinstance(spec, dict):
        return [
            Problem(
                "",
                f"the spec must be a mapping, not {_describe(spec)}",
                "start from examples/direct.yml: version: 1, host: {name: ...}, ...",
            )
        ]
    problems = _schema_problems(spec)
    problems.extend(_format_problems(spec, _Taint.of(problems)))
    problems.extend(_semantic_problems(spec, _Taint.of(problems)))
    secrets = sorted(
        (s for s in collect_secrets(spec) if len(s) >= MIN_GUARDED_SECRET), key=len, reverse=True
    )
    guarded = {
        Problem(p.pointer, _guard(p.message, secrets), _guard(p.hint, secrets), p.severity)
        for p in problems
    }
    return sorted(guarded, key=_sort_key)


def check_spec(spec: object) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The problems of a spec, and the normalised spec when none of them is an error."""
    problems = validate_spec(spec)
    if errors(problems) or not isinstance(spec, dict):
        return None, problems
    return normalise(spec), problems
