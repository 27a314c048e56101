"""The pure parts of the project's own lab tools: which apt mirror the container root comes from,
which cgroups a container is started from, and what the DNSSEC lab's zones hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from deliverd_lab import dnssec, sdbox
from deliverd_lab.common import LabError

DEB822 = """Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://archive.example/debian
Suites: bookworm bookworm-updates
Components: main
"""


@pytest.mark.parametrize(("texts", "mirror"), [
    ([DEB822], "http://archive.example/debian"),
    (["deb http://security.example/ bookworm-security main\n"
      "deb [arch=amd64] http://archive.example/debian bookworm main\n"],
     "http://archive.example/debian"),
    (["# deb http://old.example/debian bookworm main\n", DEB822],
     "http://archive.example/debian"),
    (["deb-src http://archive.example/debian bookworm main\n"], None),
    (["Types: deb-src\nURIs: http://archive.example/debian\nSuites: bookworm\n"], None),
])
def test_the_mirror_is_the_source_of_the_suite_itself(texts: list[str],
                                                      mirror: str | None) -> None:
    assert sdbox.mirror_from_sources(texts) == mirror


def test_no_source_for_the_suite_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://archive.example/debian trixie main\n")
    with pytest.raises(LabError, match="no apt source for bookworm"):
        sdbox.debian_mirror(tmp_path)


def test_a_hybrid_host_gets_a_cgroup_in_both_systemd_hierarchies(tmp_path: Path) -> None:
    for hierarchy in ("unified", "systemd", "memory"):
        (tmp_path / hierarchy).mkdir()
    assert sdbox.cgroup_dirs("b1", tmp_path) == [tmp_path / "unified" / "sdbox-b1",
                                                 tmp_path / "systemd" / "sdbox-b1"]


def test_a_unified_host_gets_one_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert sdbox.cgroup_dirs("b1", tmp_path) == [tmp_path / "sdbox-b1"]


def test_an_unbooted_run_is_no_boot_and_keeps_options_apart_from_the_command() -> None:
    argv = sdbox.unbooted_argv(Path("/r"), "n", ["--boot-like-option"], ["--volatile=x"])
    assert "--boot" not in argv and "--pipe" in argv
    assert argv[argv.index("--") + 1:] == ["--boot-like-option"]
    assert argv.index("--volatile=x") < argv.index("--")


AUTH = dnssec.Endpoint("127.0.0.60", 5353)


def test_every_zone_sends_mail_to_its_mx_host_with_a_tlsa_record() -> None:
    for zone in dnssec.ZONES:
        text = dnssec.zone_text(zone, AUTH, "127.0.0.61", "ab" * 32)
        assert f"@ IN MX 10 mx.{zone}." in text
        assert "mx IN A 127.0.0.61" in text
        assert f"_25._tcp.mx IN TLSA 3 1 1 {'ab' * 32}" in text
    assert "mx-nodane IN A" in dnssec.zone_text("secure.test", AUTH, "127.0.0.61", "ab")
    bogus = dnssec.zone_text("bogus.test", AUTH, "127.0.0.61", "ab")
    assert "badmx IN MX" in bogus and "badaddr IN MX" in bogus


SIGNED = """bogus.test. 300 IN MX 10 mx.bogus.test.
bogus.test. 300 IN RRSIG MX 13 2 300 20270101000000 20261201000000 1 bogus.test. AAAAsig1 rest
_25._tcp.mx.bogus.test. 300 IN RRSIG TLSA 13 5 300 20270101000000 20261201000000 1 bogus.test. abcdAfg more
badmx.bogus.test. 300 IN RRSIG MX 13 3 300 20270101000000 20261201000000 1 bogus.test. abcdXfg more
mx-badaddr.bogus.test. 300 IN RRSIG A 13 3 300 20270101000000 20261201000000 1 bogus.test. abcdEfg more
"""  # noqa: E501


def test_only_the_listed_signatures_are_broken_by_one_character() -> None:
    broken = dnssec.break_signatures(SIGNED).splitlines()
    before = SIGNED.splitlines()
    assert broken[:2] == before[:2]  # the apex MX stays valid
    assert broken[2].split()[12] == "abcdBfg"  # an A becomes a B ...
    assert broken[3].split()[12] == "abcdAfg"  # ... anything else an A
    assert broken[4].split()[12] == "abcdAfg"


def test_a_signature_not_found_to_break_is_an_error() -> None:
    with pytest.raises(LabError, match="badmx"):
        dnssec.break_signatures(SIGNED.replace("badmx", "goodmx"))


def test_the_resolver_trusts_the_anchors_and_answers_only_lab_zones(tmp_path: Path) -> None:
    config = dnssec.LabConfig(tmp_path)
    text = dnssec.unbound_conf_text(config, ["secure.test. IN DS 1 13 2 AB"])
    assert 'trust-anchor: "secure.test. IN DS 1 13 2 AB"' in text
    assert 'local-zone: "." refuse' in text and 'domain-insecure: "insecure.test"' in text
    assert text.count("stub-addr: 127.0.0.60@5353") == len(dnssec.ZONES)
