"""RFC 8461 without I/O: the TXT record, the policy file and MX matching, one row per rule."""

from __future__ import annotations

import pytest

from deliverd.smtp.mta_sts import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyError,
    StsMode,
    parse_policy,
    parse_txt,
)

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.example.test\r\n" \
       "max_age: 86400\r\n"


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20260101T0000"], "20260101T0000"),
    (["v=STSv1; id=20260101"], "20260101"),
    (["v=STSv1;id=abc;"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # more than one: no policy (§3.1)
    ([], None),
    (["v=STSv1"], None),  # no id
    (["v=STSv1; id=a-b"], None),  # id is alphanumeric only
    (["v=STSv1; id=" + "a" * 33], None),  # at most 32 characters
    (["v=STSv2; id=abc"], None),
])
def test_txt_record_gives_the_policy_id(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


def test_a_good_policy_parses() -> None:
    policy = parse_policy(GOOD)
    assert policy == Policy(StsMode.ENFORCE, 86400, ("mx1.example.test", "*.example.test"))


def test_lf_line_endings_and_unknown_keys_are_accepted() -> None:
    policy = parse_policy("version: STSv1\nmode: testing\nmx: mx.example.test\nmax_age: 0\n"
                          "x-extension: anything\n")
    assert policy.mode is StsMode.TESTING and policy.max_age == 0


@pytest.mark.parametrize(("text", "why"), [
    (GOOD.replace("STSv1", "STSv2"), "version"),
    (GOOD.replace("enforce", "strict"), "mode"),
    (GOOD.replace("86400", str(MAX_AGE_LIMIT + 1)), "exceeds"),
    (GOOD.replace("86400", "-1"), "number"),
    (GOOD.replace("max_age: 86400\r\n", ""), "number"),
    (GOOD.replace("mx: mx1.example.test\r\nmx: *.example.test\r\n", ""), "no mx"),
    (GOOD + "mode: testing\r\n", "twice"),
    (GOOD + "garbage line\r\n", "malformed"),
    (GOOD.replace("mx1.example.test", "mx1.*.example.test"), "mx pattern"),
    (GOOD + "x: " + "a" * 70_000 + "\r\n", "64 KiB"),
])
def test_a_bad_policy_is_refused(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(("host", "allowed"), [
    ("mx1.example.test", True),
    ("MX1.Example.Test.", True),
    ("other.example.test", True),  # *.example.test
    ("a.b.example.test", False),  # the wildcard is one label only
    ("example.test", False),
    ("mx1.example.test.evil.test", False),
])
def test_mx_matching(host: str, allowed: bool) -> None:
    assert parse_policy(GOOD).allows(host) is allowed
