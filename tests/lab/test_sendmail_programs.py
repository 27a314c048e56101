"""Programs nobody here wrote send mail through ``/usr/sbin/sendmail`` = deliverd: bsd-mailx,
PHP's mail(), git send-email, and Debian's cron mailing a job's output to its user, all run
by throwaway non-root users; every message reaches the scripted smart host once, with the
local recipients aliased and the local senders masqueraded.

``/usr/sbin/sendmail`` is replaced for the length of a test only (the original is renamed
beside it and put back in a ``finally``), since cron and mailx know no other path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deliverd_lab.sink import ReceivedMessage
from tests.fixtures.mta import MASQUERADE, MtaHost

pytestmark = pytest.mark.integration

SENDMAIL = Path("/usr/sbin/sendmail")
SAVED = SENDMAIL.with_name("sendmail.deliverd-test-saved")


def _need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (make system-deps)")
    return path


@pytest.fixture
def system_sendmail(mta_host: Callable[..., MtaHost]) -> Iterator[MtaHost]:
    """A running deliverd host whose sendmail is, for this test, /usr/sbin/sendmail."""
    if os.geteuid() != 0:
        pytest.skip("needs root to replace /usr/sbin/sendmail")
    if os.path.lexists(SAVED):  # a run killed before its finally: put the original back
        os.replace(SAVED, SENDMAIL)
    host = mta_host()
    host.engine.start()
    had_one = os.path.lexists(SENDMAIL)
    if had_one:
        os.replace(SENDMAIL, SAVED)
    try:
        SENDMAIL.symlink_to(host.sendmail)
        yield host
    finally:
        if SENDMAIL.is_symlink():
            SENDMAIL.unlink()
        if had_one:
            os.replace(SAVED, SENDMAIL)


def _one_message(host: MtaHost, timeout: float = 20) -> ReceivedMessage:
    assert host.sink.wait_for(1, timeout=timeout), host.engine.log_text()[-3000:]
    time.sleep(1)  # a second copy would arrive now
    assert len(host.sink.messages) == 1
    return host.sink.messages[0]


def test_bsd_mailx_mail_s_to_root(system_sendmail: MtaHost) -> None:
    host, user = system_sendmail, system_sendmail.users[0]
    result = host.run(user, "-s", "hello from mailx", "root", stdin=b"mailx body\n",
                      program=_need("bsd-mailx"))
    assert result.returncode == 0, result.stderr
    msg = _one_message(host)
    assert msg.mail_from == f"{user}@{MASQUERADE}"
    assert msg.rcpt_tos == ("ops@example.com",)
    assert b"\r\nSubject: hello from mailx\r\n" in msg.data
    assert b"mailx body" in msg.data


def test_php_mail_with_the_default_sendmail_path(system_sendmail: MtaHost) -> None:
    host, user = system_sendmail, system_sendmail.users[1]
    code = ('exit(mail("root, someone@example.org", "php subject", "php body", '
            '"Bcc: hidden@example.org") ? 0 : 1);')
    result = host.run(user, "-n", "-r", code, program=_need("php"))
    assert result.returncode == 0, (result.stdout, result.stderr)
    msg = _one_message(host)
    assert msg.mail_from == f"{user}@{MASQUERADE}"
    assert set(msg.rcpt_tos) == {"ops@example.com", "someone@example.org",
                                 "hidden@example.org"}
    assert b"Bcc" not in msg.data
    assert b"\r\nSubject: php subject\r\n" in msg.data


def test_git_send_email_through_sendmail_cmd(system_sendmail: MtaHost) -> None:
    host, user = system_sendmail, system_sendmail.users[2]
    git = _need("git")
    exec_path = subprocess.run([git, "--exec-path"], capture_output=True, text=True,
                               check=True).stdout.strip()
    if not Path(exec_path, "git-send-email").exists():
        pytest.skip("git send-email is not installed (git-email)")
    repo = host.root / "repo"
    repo.mkdir()
    shutil.chown(repo, user)
    env = ["-c", "user.name=Dev", "-c", "user.email=dev@example.org"]
    script = (
        f"cd {repo} && git init -q && echo hi > f && git add f && "
        f"git {' '.join(env)} commit -qm 'a patch' && git format-patch -q -1 -o out && "
        f"git {' '.join(env)} send-email --sendmail-cmd={SENDMAIL} --to=list@example.org "
        "--from='Dev <dev@example.org>' --envelope-sender=auto --confirm=never "
            "--suppress-cc=all --quiet out/*.patch"
    )
    result = host.run(user, "-c", script, program="/bin/sh")
    assert result.returncode == 0, (result.stdout, result.stderr)
    msg = _one_message(host)
    assert msg.mail_from == "dev@example.org"
    assert msg.rcpt_tos == ("list@example.org",)
    assert b"] a patch" in msg.data


@pytest.mark.slow
def test_debian_cron_mails_a_jobs_output_to_the_alias_of_its_user(
    system_sendmail: MtaHost,
) -> None:
    host, user = system_sendmail, system_sendmail.users[0]
    cron = _need("cron")
    if subprocess.run(["pgrep", "-x", "cron"], capture_output=True, check=False).returncode == 0:
        pytest.skip("a cron daemon already runs on this machine")
    job = Path(f"/etc/cron.d/deliverd-test-{os.getpid()}")
    # No MAILTO: Debian's cron mails the output to the job's user (-i -FCronDaemon -oem USER).
    job.write_text(f"* * * * * {user} echo cron output from $(id -un)\n", encoding="utf-8")
    job.chmod(0o644)
    proc = subprocess.Popen([cron, "-f", "-L", "15"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        msg = _one_message(host, timeout=150)
    finally:
        job.unlink()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert msg.rcpt_tos == ("admins@example.com",)  # through "*"
    assert msg.mail_from == f"{user}@{MASQUERADE}"
    data = msg.data
    assert f"cron output from {user}".encode() in data
    assert b"\r\nFrom: " in data and f"@{MASQUERADE}".encode() in data.split(b"\r\nFrom: ")[1]
