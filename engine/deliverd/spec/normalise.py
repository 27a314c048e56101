"""Fill every default of a valid spec from the schema: the one place defaults are applied.

Defaults live in the schema only: plain ``default`` keywords, ``if``/``then``/``else`` branches
whose ``default`` depends on a sibling (smart host ``tls`` on ``auth``, POP3 ``port`` on ``tls``),
and ``x-default-format`` for defaults built from another field (``postmaster@{/host/name}``; a
list of templates gives a list, without repeats: ``local.domains`` is ``[localhost, host.name]``).
Durations and sizes are rewritten to their canonical spelling so equal specs compare equal.
"""

from __future__ import annotations

import copy
from typing import Any

from jsonschema import Draft202012Validator

from deliverd.core.units import format_duration, format_size, parse_duration, parse_size
from deliverd.spec.resources import load_schema

_DEFS = "#/$defs/"


def normalise(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a *valid* spec with every default filled in and units canonical."""
    schema = load_schema()
    result = copy.deepcopy(spec)
    _fill(result, schema, schema)
    _fill_formatted(result, schema, schema, result)
    return result


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Merge a ``$ref`` target with the keywords written beside the ``$ref``."""
    ref = node.get("$ref")
    if not isinstance(ref, str) or not ref.startswith(_DEFS):
        return node
    target = _resolve(root["$defs"][ref[len(_DEFS):]], root)
    merged = dict(target)
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _branch_defaults(node: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """Property defaults chosen by an ``if`` evaluated against this object."""
    condition = node.get("if")
    if condition is None:
        return {}
    branch = node.get("then" if Draft202012Validator(condition).is_valid(value) else "else", {})
    props = branch.get("properties", {})
    return {k: v["default"] for k, v in props.items() if "default" in v}


def _fill(value: Any, node: dict[str, Any], root: dict[str, Any]) -> None:
    node = _resolve(node, root)
    if isinstance(value, dict) and node.get("type") == "object":
        props: dict[str, Any] = node.get("properties", {})
        branch = _branch_defaults(node, value)
        for key, sub in props.items():
            sub = _resolve(sub, root)
            if key not in value:
                if key in branch:
                    value[key] = copy.deepcopy(branch[key])
                elif "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _fill(value[key], sub, root)
                value[key] = _canonical(value[key], sub, root)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            _fill(item, node["items"], root)


def _canonical(value: Any, node: dict[str, Any], root: dict[str, Any]) -> Any:
    if not isinstance(value, str):
        return value
    if node.get("pattern") == root["$defs"]["duration"]["pattern"]:
        return format_duration(parse_duration(value))
    if node.get("pattern") == root["$defs"]["size"]["pattern"]:
        return format_size(parse_size(value))
    return value


def _fill_formatted(
    value: Any, node: dict[str, Any], root: dict[str, Any], top: dict[str, Any]
) -> None:
    node = _resolve(node, root)
    if not (isinstance(value, dict) and node.get("type") == "object"):
        return
    for key, sub in node.get("properties", {}).items():
        sub = _resolve(sub, root)
        template = sub.get("x-default-format")
        if key not in value and isinstance(template, str):
            value[key] = _format(template, top)
        elif key not in value and isinstance(template, list):
            value[key] = _unique([_format(str(item), top) for item in template])
        if key in value:
            _fill_formatted(value[key], sub, root, top)


def _unique(items: list[str]) -> list[str]:
    """Items in order without repeats (compared case-insensitively, as domains are)."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out


def _format(template: str, top: dict[str, Any]) -> str:
    """Replace ``{/json/pointer}`` fields with values of the spec."""
    out, rest = [], template
    while "{" in rest:
        before, _, tail = rest.partition("{")
        ptr, _, rest = tail.partition("}")
        node: Any = top
        for part in ptr.strip("/").split("/"):
            node = node[part]
        out.extend([before, str(node)])
    out.append(rest)
    return "".join(out)
