"""Problems found in a spec or config: a JSON pointer, what is wrong, and how to fix it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

PathParts = tuple[str | int, ...]


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Problem:
    pointer: str
    message: str
    hint: str = ""
    severity: Severity = Severity.ERROR

    def render(self) -> str:
        """One line: ``/routing/smarthost/port: 70000 is greater than ... (hint: ...)``."""
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        where = self.pointer or "/"
        text = f"{prefix}{where}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def as_dict(self) -> dict[str, str]:
        return {
            "pointer": self.pointer,
            "message": self.message,
            "hint": self.hint,
            "severity": self.severity.value,
        }


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]


def warnings(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.WARNING]


def pointer(*parts: str | int) -> str:
    """RFC 6901 JSON pointer from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def report(problems: Sequence[Problem], line: Callable[[Problem], str] = Problem.render) -> None:
    """The commands' format: warnings on stderr, errors on stdout, one per line."""
    for problem in warnings(list(problems)):
        print(problem.render(), file=sys.stderr)
    for problem in errors(list(problems)):
        print(line(problem))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --- wording and paths shared by the validation passes ------------------------------------------


def describe(value: object) -> str:
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


def literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else literal(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Taint:
    """Paths with problems; a value on, above or below one of them is not to be judged again."""

    paths: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, problems: list[Problem]) -> Taint:
        return cls(tuple(parts(p.pointer) for p in problems if p.severity is Severity.ERROR))

    def touches(self, path: PathParts, *, below: bool = True) -> bool:
        key = tuple(str(p) for p in path)
        return any(
            key[: len(bad)] == bad or (below and bad[: len(key)] == key) for bad in self.paths
        )


def parts(ptr: str) -> tuple[str, ...]:
    if not ptr:
        return ()
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/"))
