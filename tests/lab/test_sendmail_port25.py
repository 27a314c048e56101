"""Port 25 while the engine runs as its own user: ``deliverd run --user`` binds the ports below
1024 as root, then gives root up. Python's smtplib submits on port 25, and a second local
user's ``sendmail`` goes through the maildrop to a daemon that is not root (the maildrop's
ACL is what lets it read that user's file)."""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.mta import MASQUERADE, MtaHost

pytestmark = pytest.mark.integration

PORT25_ADDRESS = "127.0.0.104"


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # the real uid
    raise AssertionError("no Uid line")


def test_listens_on_port_25_as_its_own_user_and_takes_smtplib_and_sendmail_mail(
    mta_host: Callable[..., MtaHost],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to bind port 25 and switch user")
    host = mta_host(listen=[{"address": PORT25_ADDRESS, "port": 25}])
    daemon_user, submitter = host.users[0], host.users[2]
    host.queue.mkdir(mode=0o700)
    for path in (host.queue, host.engine.config.with_name("secrets.toml")):
        shutil.chown(path, daemon_user, daemon_user)
    host.start_as(daemon_user)
    assert host.engine.proc is not None
    assert _uid_of(host.engine.proc.pid) == host.uid(daemon_user)

    with smtplib.SMTP(PORT25_ADDRESS, 25, timeout=10) as smtp:
        refused = smtp.sendmail("app@example.org", ["root@localhost", "nobody@example.org"],
                                b"Subject: over port 25\r\n\r\nhello\r\n")
    assert refused == {}
    assert host.sink.wait_for(1, timeout=20), host.engine.log_text()[-3000:]
    first = host.sink.messages[0]
    assert first.mail_from == "app@example.org"
    assert set(first.rcpt_tos) == {"ops@example.com", "nobody@example.org"}

    result = host.run(submitter, "-i", "root", stdin=b"Subject: via the maildrop\n\nhi\n")
    assert result.returncode == 0, result.stderr
    assert host.sink.wait_for(2, timeout=20), host.engine.log_text()[-3000:]
    second = host.sink.messages[1]
    assert second.mail_from == f"{submitter}@{MASQUERADE}"
    assert f"from userid {host.uid(submitter)})".encode() in second.data
