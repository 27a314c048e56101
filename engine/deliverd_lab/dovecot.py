"""A real Dovecot for labs and tests: POP3 (clear with STLS, and POP3S) and SASL for Postfix.

Everything lives under the work directory: config, base_dir (sockets, ``master.pid``), state,
mailboxes and the log. Users come from a passwd-file with PLAIN passwords (lab only). The auth
socket (``auth_socket``, mode 0666) is what ``PostfixRelay(sasl_socket=...)`` points at.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deliverd_lab.common import (
    LabError,
    children_of,
    read_pid,
    reap,
    terminate,
    traversable_workdir,
    wait_for_port,
)

# log_timestamp is set to this format so that log readers (tests, a pop-before-smtp double)
# can tell when a login happened, not just that it did.
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

_AUTH_OK = re.compile(r"auth: Debug: client passdb out: OK\t\d+\tuser=(?P<user>[^\t\n]+)")
_LOGIN = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) pop3-login: (?:Info: )?Login: "
    r"user=<(?P<user>[^>]*)>, method=(?P<method>[A-Z0-9-]+), rip=(?P<rip>[^,]+), "
    r"lip=(?P<lip>[^,]+)(?P<rest>.*)$"
)


@dataclass(frozen=True)
class DovecotLogin:
    """One successful POP3 login, as Dovecot logged it."""

    time: dt.datetime  # local time, second resolution (Dovecot's log clock)
    user: str
    method: str
    remote_ip: str
    tls: bool


def parse_logins(log_text: str) -> list[DovecotLogin]:
    """Successful POP3 logins in a Dovecot log written with ``LOG_TIME_FORMAT`` timestamps."""
    logins = []
    for line in log_text.splitlines():
        match = _LOGIN.match(line)
        if match is None:
            continue
        logins.append(DovecotLogin(
            time=dt.datetime.strptime(match["time"], LOG_TIME_FORMAT),
            user=match["user"],
            method=match["method"],
            remote_ip=match["rip"],
            tls=", TLS" in match["rest"],
        ))
    return logins


class Dovecot:
    """One Dovecot instance serving POP3 and an auth socket from ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: str = "127.0.0.1",
        pop3_port: int,
        pop3s_port: int | None = None,
        users: Mapping[str, str] | None = None,
        tls_cert: tuple[bytes, bytes] | None = None,
        plaintext_auth: bool = True,
        auth_mechanisms: Sequence[str] = ("plain", "login"),
    ) -> None:
        """``tls_cert`` is (certificate chain PEM, private key PEM); with it the plain port
        offers STLS and ``pop3s_port`` (required then) speaks implicit TLS. ``plaintext_auth``
        false sets ``disable_plaintext_auth`` (Dovecot still trusts loopback peers)."""
        if tls_cert is not None and pop3s_port is None:
            raise LabError("a TLS certificate needs a pop3s_port as well")
        self.workdir = traversable_workdir(Path(workdir))
        self.listen = listen
        self.pop3_port = pop3_port
        self.pop3s_port = pop3s_port if tls_cert is not None else None
        self.users = dict(users if users is not None else {"user": "password"})
        self.tls_cert = tls_cert
        self.plaintext_auth = plaintext_auth
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.config_path = self.workdir / "dovecot.conf"
        self.base_dir = self.workdir / "run"
        self.log_path = self.workdir / "dovecot.log"
        self.auth_socket = self.workdir / "auth-client"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("run", "state"):
            (self.workdir / sub).mkdir(exist_ok=True)
        mail = self.workdir / "mail"
        mail.mkdir(exist_ok=True)
        # Mail processes run as the dovecot user (the static userdb below): it owns mailboxes.
        uid, gid = pwd.getpwnam("dovecot").pw_uid, grp.getgrnam("dovecot").gr_gid
        os.chown(mail, uid, gid)
        passwd = self.workdir / "users.passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        passwd.chmod(0o600)
        os.chown(passwd, uid, gid)  # the auth process runs as the internal (dovecot) user
        self.config_path.write_text(self._config_text())

    def _ssl_settings(self) -> str:
        if self.tls_cert is None:
            return "ssl = no\n"
        cert, key = self.workdir / "pop3-cert.pem", self.workdir / "pop3-key.pem"
        cert.write_bytes(self.tls_cert[0])
        key.write_bytes(self.tls_cert[1])
        key.chmod(0o600)
        return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"

    def _config_text(self) -> str:
        w = self.workdir
        pop3s = self.pop3s_port if self.pop3s_port is not None else 0
        return (
            f"base_dir = {self.base_dir}\n"
            f"state_dir = {w / 'state'}\n"
            f"log_path = {self.log_path}\n"
            f"info_log_path = {self.log_path}\n"
            f'log_timestamp = "{LOG_TIME_FORMAT} "\n'
            "protocols = pop3\n"
            f"listen = {self.listen}\n"
            + self._ssl_settings()
            + f"disable_plaintext_auth = {'no' if self.plaintext_auth else 'yes'}\n"
            f"auth_mechanisms = {' '.join(self.auth_mechanisms)}\n"
            "auth_verbose = yes\n"
            # Successful SASL logins (Postfix asks Dovecot) appear only in debug lines; Postfix
            # itself names the user only once a MAIL transaction starts. Passwords stay out:
            # auth_debug_passwords is left off.
            "auth_debug = yes\n"
            "first_valid_uid = 100\n"
            "default_internal_user = dovecot\n"
            "default_login_user = dovenull\n"
            f"mail_location = maildir:{w / 'mail'}/%u\n"
            "passdb {\n"
            "  driver = passwd-file\n"
            f"  args = scheme=PLAIN username_format=%u {w / 'users.passwd'}\n"
            "}\n"
            "userdb {\n"
            "  driver = static\n"
            f"  args = uid=dovecot gid=dovecot home={w / 'mail'}/%u\n"
            "}\n"
            "service pop3-login {\n"
            f"  inet_listener pop3 {{\n    port = {self.pop3_port}\n  }}\n"
            f"  inet_listener pop3s {{\n    port = {pop3s}\n    ssl = yes\n  }}\n"
            "}\n"
            "service auth {\n"
            f"  unix_listener {self.auth_socket} {{\n    mode = 0666\n  }}\n"
            "}\n"
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return read_pid(self.base_dir / "master.pid")

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which("dovecot")
        if binary is None:
            raise LabError("dovecot is not installed")
        # Foreground mode under our own Popen: an early exit (bad config) is seen at once,
        # and a daemonising dovecot would keep our output pipes open forever.
        with (self.workdir / "dovecot.out").open("wb") as out:
            self._proc = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_path)], stdout=out, stderr=out,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except LabError:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        ports = [self.pop3_port] + ([self.pop3s_port] if self.pop3s_port is not None else [])
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    output = (self.workdir / "dovecot.out").read_text(errors="replace")
                    raise LabError(f"dovecot exited {self._proc.returncode}: {output.strip()}\n"
                                   f"{self.log_text()}")
                try:
                    wait_for_port(self.listen, port, 0.2, "dovecot")
                    break
                except LabError:
                    if time.monotonic() > deadline:
                        raise
                    continue

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master (its children follow); safe to call twice or after a failed start."""
        pid = self.pid
        if pid is None and self._proc is not None and self._proc.poll() is None:
            pid = self._proc.pid
        if pid is not None:
            workers = children_of(pid)
            terminate(pid, timeout)
            reap(workers)  # they leave by themselves when the master is gone
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
            self._proc = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logins(self, user: str | None = None) -> list[DovecotLogin]:
        """Successful POP3 logins so far (optionally only ``user``'s), oldest first."""
        return [x for x in parse_logins(self.log_text()) if user is None or x.user == user]

    def auth_successes(self) -> list[str]:
        """Users of every successful authentication, in log order: the SASL logins Postfix
        asked for (a probe that sends no MAIL leaves no trace in Postfix's own log) and POP3
        logins alike."""
        return [m["user"] for m in _AUTH_OK.finditer(self.log_text())]
