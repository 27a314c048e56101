"""JSON Schema errors in our words: one problem per failing keyword, with pointer and hint.

jsonschema's own messages echo the offending value, and a value may be a password, so each
keyword has its own translation built from the schema (``x-hint``, names of the ``$defs``) and
the value's kind, never from jsonschema's text. Unknown keywords still give a pointer.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from jsonschema.exceptions import best_match

from deliverd.spec.problems import (
    PathParts,
    Problem,
    describe,
    literal,
    pointer,
    show,
)
from deliverd.spec.resources import load_schema
from deliverd.spec.schema_fields import (
    SchemaNode,
    child_schema,
    field_schema,
    validator,
)

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
    return [f.problem(f"must be {wanted}, not {describe(f.value)}", hint)]


def _on_enum(f: _Failure) -> list[Problem]:
    choices = [str(c) for c in f.rule]
    hint = f.hint()
    if isinstance(f.value, str) and not f.secret:
        close = difflib.get_close_matches(f.value.lower(), choices, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
    return [f.problem("must be one of: " + ", ".join(choices), hint)]


def _on_const(f: _Failure) -> list[Problem]:
    return [f.problem(f"must be {literal(f.rule)}")]


def _bounds_hint(f: _Failure) -> str:
    low, high = f.schema.get("minimum"), f.schema.get("maximum")
    if low is not None and high is not None:
        return f.hint(f"a whole number from {low} to {high}")
    return f.hint()


def _on_minimum(f: _Failure) -> list[Problem]:
    return [f.problem(f"{show(f.value)} is less than the minimum of {f.rule}", _bounds_hint(f))]


def _on_maximum(f: _Failure) -> list[Problem]:
    return [f.problem(f"{show(f.value)} is greater than the maximum of {f.rule}", _bounds_hint(f))]


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
    return [f.problem(f"{show(f.value)} is not {_noun(f)}")]


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
        sub = child_schema(f.field, name) or {}
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


def schema_problems(spec: object) -> list[Problem]:
    problems: list[Problem] = []
    for error in validator().iter_errors(spec):
        problems.extend(_translate(error))
    return problems
