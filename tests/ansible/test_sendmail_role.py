"""The role with ``deliverd_provide_sendmail: true`` on a host already running Postfix on
127.0.0.1:25, under both service managers: converge stops and disables Postfix, deliverd answers
on port 25 as its own user, /usr/sbin/sendmail, /usr/lib/sendmail and /usr/bin/mailq are
deliverd's, a non-root user's sendmail reaches the smart host masqueraded, a second run and a
check-mode run change nothing, and ``deliverd_state: absent`` puts Postfix's programs back byte
for byte and Postfix back on port 25.

Each case runs in its own real systemd container (tests/fixtures/sdbox.py: Debian 12, Postfix
installed as Debian's "Local only" configuration), never on this machine's own programs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.role import recap_changed
from tests.fixtures.sdbox import IN_WHEELS, SdBox, booted, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

if os.geteuid() != 0:
    pytest.skip("booting a systemd container (systemd-nspawn) needs root", allow_module_level=True)

PROGRAMS = ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq")
WRAPPERS = "/opt/deliverd/bin"
SINK_PORT = 2525
USER = "alice"
# What each program is: a link and its target, or a file and its SHA-256 (inside the container).
STATE_SCRIPT = """import hashlib, json, os, sys
state = {}
for path in sys.argv[1:]:
    if os.path.islink(path):
        state[path] = ["link", os.readlink(path)]
    elif os.path.exists(path):
        state[path] = ["file", hashlib.sha256(open(path, "rb").read()).hexdigest()]
    else:
        state[path] = None
print(json.dumps(state))
"""
BANNER_SCRIPT = """import socket
with socket.create_connection(("127.0.0.1", 25), 5) as s:
    print(s.recv(512).decode())
"""


def _spec() -> dict[str, object]:
    return {
        "version": 1,
        "host": {"name": "web1.role-mta.deliverd.test"},
        "listen": [{"address": "127.0.0.1", "port": 25}],
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": SINK_PORT, "tls": "none"}},
        "local": {"aliases": {"root": ["ops@example.com"]}},
        "masquerade": {"domain": "example.com"},
        "dns": {"nameservers": ["127.0.0.1:9"]},
    }


def _vars(manager: str, state: str = "present") -> dict[str, object]:
    return {"deliverd_spec": _spec(), "deliverd_state": state, "deliverd_purge_queue": True,
            "deliverd_provide_sendmail": True, "deliverd_service_manager": manager,
            "deliverd_install_from": "wheelhouse", "deliverd_wheelhouse": IN_WHEELS,
            "ansible_python_interpreter": "/usr/bin/python3"}


def _play(box: SdBox, manager: str, *options: str, state: str = "present") -> str:
    proc = box.play(_vars(manager, state), *options)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _programs(box: SdBox, suffix: str = "") -> dict[str, list[str] | None]:
    paths = [path + suffix for path in PROGRAMS]
    state: dict[str, list[str] | None] = json.loads(
        box.run("python3", "-c", STATE_SCRIPT, *paths).stdout)
    return {path.removesuffix(suffix) if suffix else path: value
            for path, value in state.items()}


def _banner(box: SdBox) -> str:
    """The greeting on the container's 127.0.0.1:25 ("" when nothing answers)."""
    return box.run("python3", "-c", BANNER_SCRIPT, check=False).stdout


def _unit_state(box: SdBox, unit: str) -> tuple[str, str]:
    active = box.run("systemctl", "is-active", unit, check=False).stdout.strip()
    enabled = box.run("systemctl", "is-enabled", unit, check=False).stdout.strip()
    return active, enabled


def _messages(box: SdBox, maildir: str) -> list[str]:
    names = box.run("sh", "-c", f"ls {maildir}/new 2>/dev/null || true").stdout.split()
    return [box.run("cat", f"{maildir}/new/{name}").stdout for name in names]


@pytest.fixture(params=["systemd", "supervised"])
def manager(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def box(manager: str, sdbox_wheels: Path, tmp_path: Path) -> Iterator[SdBox]:
    work = tmp_path / "work"
    work.mkdir()
    with booted(f"deliverd-mta-{manager}-{os.getpid()}", sdbox_wheels, work) as sdbox:
        yield sdbox


def test_role_replaces_a_running_postfix_and_absent_gives_it_back(box: SdBox,
                                                                  manager: str) -> None:
    box.run("systemctl", "enable", "--now", "postfix.service")
    wait_until(lambda: box.answers(25), "Postfix on port 25")
    assert "Postfix" in _banner(box)
    before = _programs(box)
    assert before["/usr/sbin/sendmail"] is not None and before["/usr/sbin/sendmail"][0] == "file"
    maildir = box.start_sink(SINK_PORT)

    output = _play(box, manager, "--diff")
    assert "Stop and disable a Postfix or Exim that holds port 25" in output
    assert _unit_state(box, "postfix.service") == ("inactive", "disabled")
    wait_until(lambda: box.answers(25), "deliverd on port 25")
    assert "Postfix" not in _banner(box)
    engine_user = box.run("ps", "-o", "user=", "-C", "deliverd").stdout
    assert set(engine_user.split()) == {"deliverd"}, engine_user
    for path, state in _programs(box).items():
        assert state is not None and state[0] == "link", (path, state)
        assert Path(state[1]).parent == Path(WRAPPERS), (path, state)
    assert _programs(box, ".pre-deliverd") == before

    box.run("python3", "-c", "import smtplib\n"
            "with smtplib.SMTP('127.0.0.1', 25, timeout=10) as s:\n"
            "    s.sendmail('app@example.org', ['root@localhost'],"
            " b'Subject: port 25\\r\\n\\r\\nthrough-port-25\\r\\n')")
    box.run("useradd", "-m", "-s", "/bin/sh", USER)
    box.run("sh", "-c", f"printf 'Subject: sendmail\\n\\nfrom-{USER}\\n' | "
            f"runuser -u {USER} -- /usr/sbin/sendmail -i root")
    wait_until(lambda: box.delivered(maildir, "through-port-25")
               and box.delivered(maildir, f"from-{USER}"), "both messages at the smart host")
    messages = _messages(box, maildir)
    assert len(messages) == 2, messages
    for message in messages:
        assert "X-RcptTo: ops@example.com" in message, message
    from_user = next(m for m in messages if f"from-{USER}" in m)
    assert f"X-MailFrom: {USER}@example.com" in from_user, from_user
    assert re.search(rf"^From: .*\b{USER}@example\.com\b", from_user, re.M), from_user
    box.run("runuser", "-u", USER, "--", "/usr/bin/mailq")

    assert recap_changed(_play(box, manager)) == 0
    assert recap_changed(_play(box, manager, "--check", "--diff")) == 0

    _play(box, manager, state="absent")
    assert _programs(box) == before
    assert all(state is None for state in _programs(box, ".pre-deliverd").values())
    assert _unit_state(box, "postfix.service") == ("active", "enabled")
    wait_until(lambda: "Postfix" in _banner(box), "Postfix back on port 25")
