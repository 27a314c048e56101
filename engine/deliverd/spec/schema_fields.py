"""Where a field of a spec sits in the schema, and which of its values are secrets.

Everything that reads the schema by path lives here: the strict validator (a port written as
25.0 is not an integer), ``$ref`` resolution, the schema of one field, and a walk over every
value of an input with its schema, which is how secrets are found (``x-secret``, or a key that
looks like a password even where the schema does not know it) and redacted.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, validators

from deliverd.spec.problems import PathParts
from deliverd.spec.resources import load_schema

SchemaNode = dict[str, Any]

REDACTED = "<redacted>"
_DEFS = "#/$defs/"
_SECRET_NAME = re.compile(r"pass|pasw|pwd|secret|token", re.IGNORECASE)


def _is_integer(_checker: object, instance: object) -> bool:
    # JSON Schema counts 25.0 as an integer; a port or a limit written that way is a mistake.
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@cache
def validator() -> Any:
    return _StrictValidator(load_schema())


def _resolve(node: Mapping[str, Any]) -> SchemaNode:
    """A schema node with its ``$ref`` target merged under the keywords written beside it."""
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_DEFS):
        merged = _resolve(load_schema()["$defs"][ref[len(_DEFS) :]])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return dict(node)


def child_schema(node: SchemaNode | None, key: object) -> SchemaNode | None:
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
        node = child_schema(node, part)
    return node


@dataclass(frozen=True)
class FieldNode:
    path: PathParts
    value: object
    schema: SchemaNode | None
    secret: bool


def walk(spec: object) -> Iterator[FieldNode]:
    """Every value of the input with its schema; iterative so deep or cyclic input is safe."""
    seen: set[int] = set()
    stack = [FieldNode((), spec, _resolve(load_schema()), False)]
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
            sub = child_schema(node.schema, key)
            secret = node.secret or _is_secret_field(sub, key, value)
            stack.append(FieldNode((*node.path, key), value, sub, secret))


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
    for node in walk(spec):
        if not node.secret or isinstance(node.value, dict | list | bool) or node.value is None:
            continue
        found.add(str(node.value))
    return frozenset(found)


def redact_secrets(spec: object) -> object:
    """A copy of a spec with every ``x-secret`` value replaced by ``<redacted>``."""
    result = copy.deepcopy(spec)
    for node in walk(result):
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
