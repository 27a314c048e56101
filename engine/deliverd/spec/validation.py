"""Judge a delivery spec: every problem at once, each with a JSON pointer, a message and a hint.

Three passes, each only looking at what the previous ones accepted, so one mistake is reported
once: the JSON Schema (its errors translated into our own words, because jsonschema's messages
echo values and a value may be a password), the ``x-format`` checks that need code (IP
addresses, networks, nameservers), and the semantic rules that relate fields to each other.

Secrets never reach a message: messages are built per keyword without echoing secret fields,
and as a last guard every secret string of the input is cut out of every message and hint.
"""

from __future__ import annotations

import re
from typing import Any

from deliverd.spec.formats import format_problems
from deliverd.spec.normalise import normalise
from deliverd.spec.problems import (
    Problem,
    Severity,
    Taint,
    describe,
    errors,
    parts,
)
from deliverd.spec.rules import semantic_problems
from deliverd.spec.schema_errors import schema_problems
from deliverd.spec.schema_fields import (
    REDACTED,
    collect_secrets,
    redact_secrets,
)

__all__ = ["MIN_GUARDED_SECRET", "REDACTED", "check_spec", "redact_secrets", "validate_spec"]

# Shorter "secrets" would be cut out of ordinary words ("is", "port"); they are too short to
# be worth guarding and echoed values are never secret fields anyway.
MIN_GUARDED_SECRET = 4
_INDEX = re.compile(r"[0-9]+")


def _guard(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    # The marker itself could contain a (strange) secret: then say nothing rather than leak.
    return "" if any(secret in text for secret in secrets) else text


def _sort_key(problem: Problem) -> tuple[tuple[tuple[int, int, str], ...], int, str]:
    key = tuple(
        (0, int(p), "") if _INDEX.fullmatch(p) else (1, 0, p) for p in parts(problem.pointer)
    )
    return key, int(problem.severity is Severity.WARNING), problem.message


def validate_spec(spec: object) -> list[Problem]:
    """Every problem of a spec at once, errors and warnings, sorted by pointer."""
    if not isinstance(spec, dict):
        return [
            Problem(
                "",
                f"the spec must be a mapping, not {describe(spec)}",
                "start from examples/direct.yml: version: 1, host: {name: ...}, ...",
            )
        ]
    problems = schema_problems(spec)
    problems.extend(format_problems(spec, Taint.of(problems)))
    problems.extend(semantic_problems(spec, Taint.of(problems)))
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
