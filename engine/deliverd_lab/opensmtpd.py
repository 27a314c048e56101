"""OpenSMTPD 6.8 (Debian's opensmtpd, unpacked, see ``deliverd_lab.unpacked``) as a relay.

The whole smtpd.conf (``config()``): the per-session message limit raised from 100, listen on
loopback, ``relay host smtp://HOST:PORT`` for mail from local addresses, and what an operator
relaying everything to one smart host raises: the outbound limits per route (5 connections,
5 s between new ones, 100 mails per session by default) and the scheduler's envelopes per
run (10). Untuned it delivered about 15 msg/s in bench/relay; tuned, about 240.

Its spool (``/var/spool/smtpd``), chroot (``/var/lib/opensmtpd``) and control socket
(``/run/smtpd.sock``) are compiled in: inside the server's mount namespace they are bind
mounts of the work directory. The queue (``queue_fs``) has the message and its envelope files
in the spool before the 250 (the binary imports ``fsync``; which files it syncs was not
traced); its users opensmtpd/opensmtpq exist in the namespace only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from deliverd_lab.unpacked import Isolation, UnpackedRelay, User, span_seconds

PACKAGES = ("opensmtpd",)
USERS = (User("opensmtpd", 64991), User("opensmtpq", 64992))
_DELAY = re.compile(r"mta delivery .* delay=(?P<t>[0-9hmsd]+) result=\"Ok\"")


class OpenSmtpdRelay(UnpackedRelay):
    name = "opensmtpd"
    packages = PACKAGES

    def __init__(self, workdir: Path, cache: Path, *, listen: str = "127.0.0.1", port: int,
                 smarthost: str, smarthost_port: int) -> None:
        super().__init__(workdir, cache, listen=listen, port=port)
        self.spool = workdir / "spool"
        self.varlib = workdir / "varlib"
        self.run = workdir / "run"
        for directory in (self.spool, self.varlib / "opensmtpd" / "empty", self.run):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "smtpd.conf"
        self.config_path.write_text(self.config(smarthost, smarthost_port))
        self.config_path.chmod(0o644)

    def config(self, smarthost: str, smarthost_port: int) -> str:
        # Its default of 100 messages per session ends smtp-source's longer sessions with 452.
        return ("smtp limit max-mails 100000\n"
                "mta limit max-conn-per-route 20 max-conn-per-host 20 conn-delay-route 0 "
                "conn-delay-relay 0 session-mail-max 100000\n"
                "scheduler limit max-schedule 100\n"
                f"listen on {self.listen} port {self.port}\n"
                f'action "relay" relay host smtp://{smarthost}:{smarthost_port}\n'
                'match from local for any action "relay"\n')

    def start(self, timeout: float = 30.0) -> None:
        isolation = Isolation(self.workdir, users=USERS, binds={
            "/var/spool": self.spool, "/var/lib": self.varlib, "/run": self.run})
        self._start(isolation.command(
            [str(self.root / "usr/sbin/smtpd"), "-d", "-f", str(self.config_path)]), timeout)

    def queue_empty(self) -> bool:
        return not any(files for _d, _s, files in os.walk(self.spool / "smtpd" / "queue"))

    def delays(self) -> list[float]:
        """Per-recipient delay= of its delivery lines (whole seconds only)."""
        return [span_seconds(m["t"]) for m in _DELAY.finditer(self.log_text())]
