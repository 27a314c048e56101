"""How the semantic rules read a spec: a view that refuses what was already rejected.

A rule reads fields through ``View``: a value the schema or the format checks rejected raises
``Skip`` (so one mistake is reported once, by the pass that found it), a missing value reads
as None or as the schema's default. ``warn`` and ``error`` make the problems rules yield.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from deliverd.spec.problems import PathParts, Problem, Severity, Taint, pointer
from deliverd.spec.schema_fields import field_schema


class Skip(Exception):
    """A rule reads a field the schema already rejected: that mistake is reported once."""


_MISSING = object()


@dataclass(frozen=True)
class View:
    """Read access for rules: a rejected value raises ``Skip``, a missing one gives None."""

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
            raise Skip
        return self._lookup(path) is not _MISSING

    def get(self, *path: str | int) -> object:
        if self.bad.touches(path):
            raise Skip
        found = self._lookup(path)
        return None if found is _MISSING else found

    def maybe(self, *path: str | int) -> object:
        """Like ``get``, but a rejected value counts as missing (for rules where that is safe)."""
        try:
            return self.get(*path)
        except Skip:
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


def warn(path: PathParts, message: str, hint: str) -> Problem:
    return Problem(pointer(*path), message, hint, Severity.WARNING)


def error(path: PathParts, message: str, hint: str) -> Problem:
    return Problem(pointer(*path), message, hint)


Rule = Callable[[View], Iterator[Problem]]
SmarthostRule = Callable[[View, PathParts], Iterator[Problem]]
