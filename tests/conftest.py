"""Shared fixtures live in tests/fixtures/, one module per kind of real server."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.dns",
    "tests.fixtures.smtp_sink",
    "tests.fixtures.engine",
    "tests.fixtures.mailservers",
    "tests.fixtures.prometheus",
    "tests.fixtures.mta",
    "tests.fixtures.dnssec",
    "tests.fixtures.sdbox",
]
