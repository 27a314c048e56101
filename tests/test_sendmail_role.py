"""The role with ``deliverd_provide_sendmail: true`` on this machine: /usr/sbin/sendmail,
/usr/lib/sendmail and /usr/bin/mailq become deliverd's, the engine answers on port 25 as its
own user, a non-root user's sendmail reaches the smart host, a second run and a check-mode run
change nothing, and ``deliverd_state: absent`` puts the previous programs back byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deliverd_lab.sink import Sink, free_port
from tests.fixtures.role import recap_changed, run_role

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROGRAMS = (Path("/usr/sbin/sendmail"), Path("/usr/lib/sendmail"), Path("/usr/bin/mailq"))
SINK_ADDRESS = "127.0.0.106"

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _state(path: Path) -> tuple[str, str] | None:
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.exists():
        return ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return None


@pytest.fixture
def prefix() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="deliverd-mta-role-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _play(tmp: Path, prefix: Path, spec: dict[str, Any], *options: str,
          state: str = "present") -> str:
    proc = run_role(tmp, {"deliverd_prefix": str(prefix), "deliverd_spec": spec,
                          "deliverd_state": state, "deliverd_purge_queue": True,
                          "deliverd_provide_sendmail": True}, *options)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def test_role_makes_deliverd_the_hosts_mta_and_absent_gives_the_programs_back(
    tmp_path: Path, prefix: Path, smtp_sink: Callable[..., Sink], local_users: list[str],
) -> None:
    if not (BIN / "ansible-playbook").exists() or shutil.which("dpkg-divert") is None:
        pytest.skip("needs ansible-playbook in the venv and dpkg-divert")
    before = {path: _state(path) for path in PROGRAMS}
    sink = smtp_sink(SINK_ADDRESS, free_port([SINK_ADDRESS]))
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": "web1.role-mta.deliverd.test"},
        "listen": [{"address": "127.0.0.1", "port": free_port()},
                   {"address": SINK_ADDRESS, "port": 25}],
        "queue": {"path": str(prefix / "var" / "spool" / "deliverd")},
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": SINK_ADDRESS, "port": sink.port, "tls": "none"}},
        "local": {"aliases": {"root": ["ops@example.com"]}},
        "masquerade": {"domain": "example.com"},
        "dns": {"nameservers": ["127.0.0.1:9"]},
    }
    wrappers = prefix / "opt" / "deliverd" / "bin"
    try:
        _play(tmp_path, prefix, spec, "--diff")
        for path in PROGRAMS:
            assert path.is_symlink() and Path(os.readlink(path)).parent == wrappers, path
            if before[path] is not None:
                assert _state(Path(f"{path}.pre-deliverd")) == before[path]

        with smtplib.SMTP(SINK_ADDRESS, 25, timeout=10) as smtp:
            assert smtp.sendmail("app@example.org", ["root@localhost"],
                                 b"Subject: port 25\r\n\r\nhi\r\n") == {}
        user = local_users[1]
        sent = subprocess.run(["runuser", "-u", user, "--", "/usr/sbin/sendmail", "-i", "root"],
                              input=b"Subject: sendmail\n\nhi\n", capture_output=True,
                              check=False, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert sink.wait_for(2, timeout=30)
        assert {m.mail_from for m in sink.messages} == {"app@example.org",
                                                        f"{user}@example.com"}
        assert all(m.rcpt_tos == ("ops@example.com",) for m in sink.messages)
        listing = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/mailq"],
                                 capture_output=True, check=False, timeout=60)
        assert listing.returncode == 0, listing.stderr

        assert recap_changed(_play(tmp_path, prefix, spec)) == 0
        assert recap_changed(_play(tmp_path, prefix, spec, "--check", "--diff")) == 0
    finally:
        _play(tmp_path, prefix, spec, state="absent")
    assert {path: _state(path) for path in PROGRAMS} == before
    for path in PROGRAMS:
        assert not Path(f"{path}.pre-deliverd").exists()
