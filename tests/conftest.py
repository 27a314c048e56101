"""Shared fixtures live in tests/fixtures/, one module per kind of real server.

The suite runs on every core with pytest-xdist (``make test``: ``-n auto --dist loadgroup``).
``pytest_collection_modifyitems`` below gives every test an ``xdist_group``: normally its own
file, so a file's module and session fixtures are made once on one worker; files that share
something of the whole machine (fixed lab addresses, network namespaces, port 25) share one
group, so they never run at the same time. The longest groups are handed out first, so the
run does not end waiting for one of them.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

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

TESTS = Path(__file__).resolve().parent

# Files that use one thing of the whole machine, by the group that serialises them.
SHARED_GROUPS = {
    # The DNSSEC lab's NSD and Unbound listen on fixed loopback addresses.
    "dnssec-lab": ("lab/test_resolver_dnssec.py", "lab/test_dane_delivery.py"),
    # The role on localhost: the one `deliverd` system user, made and changed by each run.
    "localhost-role": (
        "ansible/test_ansible_role.py",
        "ansible/test_dkim_role.py",
        "ansible/test_collection_tarball.py",
        "ansible/test_demo.py",
    ),
}

# How long each slow file took in a full parallel run on two cores, in seconds (CONTRIBUTING.md,
# "The test suite"); every other file counts as 1. Groups start in decreasing order of the sum
# of their files, so no long one is handed out last.
SLOW_FILES = {
    "ansible/test_molecule_lab.py": 1100,
    "ansible/test_systemd_role.py": 900,
    "ansible/test_ansible_role.py": 700,
    "ansible/test_sendmail_role.py": 660,
    "ansible/test_molecule_systemd.py": 360,
    "ansible/test_ansible_sanity.py": 140,
    "ansible/test_collection_tarball.py": 120,
    "lab/test_crash.py": 90,
    "ansible/test_collection.py": 80,
    "ansible/test_dkim_role.py": 55,
    "ansible/test_demo.py": 40,
}


def _relative(item: pytest.Item) -> str:
    return item.path.resolve().relative_to(TESTS).as_posix()


def _group_of(path: str) -> str:
    for group, files in SHARED_GROUPS.items():
        if path in files:
            return group
    return path


def _weight(group: str) -> int:
    members = SHARED_GROUPS.get(group, (group,))
    return sum(SLOW_FILES.get(member, 1) for member in members)


# A wrapper: xdist reads the marks in its own hook of the same name, and a wrapper's part
# before ``yield`` runs before every plain implementation (tryfirst is not enough there).
@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        group = _group_of(_relative(item))
        item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    # A stable sort: within a group, and among equal weights, the collection order stays.
    ordered = sorted(groups, key=_weight, reverse=True)
    items[:] = [item for group in ordered for item in groups[group]]
    return (yield)
