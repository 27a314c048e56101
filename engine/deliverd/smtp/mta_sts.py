"""MTA-STS (RFC 8461) without I/O: the TXT record, the policy file, and which MX it allows.

``parse_txt`` reads the ``_mta-sts.<domain>`` TXT answer (exactly one ``v=STSv1`` record, with a
valid ``id``), ``parse_policy`` the policy file (strictly: every required field once, known
modes, ``max_age`` within RFC 8461's bound), and ``Policy.allows`` matches an MX host name
against its ``mx`` patterns (``*.example.com`` stands for exactly one label).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: about one year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_MX_PATTERN = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9-]+$")


class StsMode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(ValueError):
    """The policy file (or TXT record) does not follow RFC 8461."""


@dataclass(frozen=True)
class Policy:
    mode: StsMode
    max_age: int
    mx: tuple[str, ...]

    @property
    def text(self) -> str:
        """The policy's lines in canonical order (TLS-RPT's policy-string)."""
        lines = ["version: STSv1", f"mode: {self.mode.value}"]
        lines += [f"mx: {mx}" for mx in self.mx]
        return "\n".join([*lines, f"max_age: {self.max_age}"])

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: the MX host matches one ``mx`` pattern (a wildcard is one label)."""
        name = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, rest = name.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id of the one ``v=STSv1`` record, or None (none, several, or malformed)."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
        elif part.strip():
            return None
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str) -> Policy:
    """The policy file as RFC 8461 §3.2 defines it; raises ``PolicyError``."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError("policy larger than 64 KiB")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key):
            raise PolicyError(f"malformed policy line {line[:60]!r}")
        if key == "mx":
            mx.append(_mx_pattern(value))
        elif key in fields:
            raise PolicyError(f"policy field {key} appears twice")
        else:
            fields[key] = value  # unknown keys are kept and ignored (RFC 8461 §3.2)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    try:
        mode = StsMode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(f"unknown policy mode {fields.get('mode')!r}") from None
    max_age_text = fields.get("max_age", "")
    if not max_age_text.isdigit() or len(max_age_text) > 10:
        raise PolicyError("policy max_age is not a number")
    max_age = int(max_age_text)
    if max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"policy max_age {max_age} exceeds {MAX_AGE_LIMIT}")
    if mode is not StsMode.NONE and not mx:
        raise PolicyError("policy names no mx")
    return Policy(mode, max_age, tuple(mx))


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    if not _MX_PATTERN.match(pattern):
        raise PolicyError(f"malformed mx pattern {value[:60]!r}")
    return pattern
