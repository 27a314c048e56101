"""Exim 4 (Debian's exim4-daemon-light, unpacked, see ``deliverd_lab.unpacked``) as a relay.

Configured as a user would for "relay everything from loopback to one smart host": a
``manualroute`` router to ``[host]:port``, an ``smtp`` transport without TLS, immediate delivery
(one delivery process forked per message, Exim's normal mode) and the spool fsynced before the
250 (Exim's default; ``disable_fsync`` stays false). ``smtp_accept_queue_per_connection = 0``
because its default of 10 leaves every further message of a session to the next queue run, and
``smtp_accept_max_per_connection = 0`` because its default of 1,000 ends a longer session with
421 (smtp-source's 20 sessions carry about 1,000 messages each in the default workload).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from deliverd_lab.unpacked import LIB_DIR, Isolation, UnpackedRelay, User, span_seconds, uid_owned

PACKAGES = ("exim4-base", "exim4-config", "exim4-daemon-light", "libidn12")
EXIM_USER = User("Debian-exim", 64990)
# Exim's QT= (time on the queue, +millisec): "0.045s", "1.5s", "2m3s", "1h2m".
_QT = re.compile(r" => .* QT=(?P<t>[0-9hms.]+)")


class EximRelay(UnpackedRelay):
    name = "exim"
    packages = PACKAGES

    def __init__(self, workdir: Path, cache: Path, *, listen: str = "127.0.0.1", port: int,
                 smarthost: str, smarthost_port: int) -> None:
        super().__init__(workdir, cache, listen=listen, port=port)
        self.spool = workdir / "spool"
        self.logs = workdir / "log"
        for directory in (self.spool, self.logs):
            directory.mkdir(exist_ok=True)
            uid_owned(directory, EXIM_USER)
        self.config_path = workdir / "exim.conf"
        self.config_path.write_text(self.config(smarthost, smarthost_port))

    def config(self, smarthost: str, smarthost_port: int) -> str:
        return f"""\
primary_hostname = exim.bench
spool_directory = {self.spool}
log_file_path = {self.logs}/%slog
pid_file_path = {self.workdir}/exim.pid
exim_user = {EXIM_USER.name}
exim_group = {EXIM_USER.name}
never_users = root
daemon_smtp_ports = {self.port}
local_interfaces = {self.listen}
log_selector = +queue_time +millisec
smtp_accept_queue_per_connection = 0
smtp_accept_max_per_connection = 0
hostlist relay_from_hosts = 127.0.0.0/8
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept hosts = +relay_from_hosts
  deny

begin routers
smarthost:
  driver = manualroute
  domains = *
  route_list = * {smarthost}
  transport = remote_smtp
  self = send
  no_more

begin transports
remote_smtp:
  driver = smtp
  port = {smarthost_port}
  hosts_avoid_tls = *

begin retry
* * F,1h,5s
"""

    def start(self, timeout: float = 30.0) -> None:
        isolation = Isolation(
            self.workdir, users=[EXIM_USER],
            # Exim re-executes /usr/sbin/exim4 for deliveries and needs libidn.so.12.
            overlays={"/usr/sbin": self.root / "usr/sbin",
                      LIB_DIR: self.root / LIB_DIR.lstrip("/")},
        )
        self._start(isolation.command(
            ["/usr/sbin/exim4", "-C", str(self.config_path), "-bdf", "-q5s"]), timeout)

    def queue_empty(self) -> bool:
        return not any(n.endswith("-H") for _d, _s, files in os.walk(self.spool / "input")
                       for n in files)

    def log_text(self) -> str:
        path = self.logs / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delays(self) -> list[float]:
        """Per-recipient time on the queue (arrival -> the next hop's 250), Exim's QT=."""
        return [span_seconds(m["t"]) for m in _QT.finditer(self.log_text())]
