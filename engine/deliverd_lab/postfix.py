"""A real Postfix for labs and tests: a SASL-authenticating smart host that relays onward.

Each instance has its own config directory, queue and data directories and mail log under the
work directory; it accepts mail on ``listen:port`` and forwards everything to ``relayhost``
(in tests an aiosmtpd sink the test inspects). Two shapes:

- smart host (``require_auth=True``): STARTTLS with a given key+chain file, AUTH through
  Dovecot's socket, AUTH only after TLS, relaying only for authenticated clients;
- relay (``require_auth=False``, no TLS, no SASL): a plain store-and-forward MTA with its normal
  durable queue, trusting loopback clients: the benchmarks' reference point.

Postfix refuses a non-default config directory unless the default ``/etc/postfix/main.cf``
lists it in ``alternate_config_directories``; ``start()`` adds the directory there (creating
that file from Debian's template when the package was installed with "No configuration") and
``stop()`` removes it again, both under a file lock because tests run many instances at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from deliverd_lab.common import (
    LabError,
    pid_alive,
    processes_with_env,
    read_pid,
    reap,
    terminate,
    traversable_workdir,
    wait_for_port,
    wait_gone,
)

DEFAULT_CONFIG_DIR = Path("/etc/postfix")
DEBIAN_MAIN_CF = Path("/usr/share/postfix/main.cf.debian")
_ALT_DIRS = "alternate_config_directories"
_SASL_USER = re.compile(r"sasl_method=(?P<method>[A-Z0-9-]+), sasl_username=(?P<user>[^,\s]+)")

# The services of Debian's master.cf that a relay needs, none chrooted: a chroot would hide
# Dovecot's auth socket and the work directory from smtpd. The smtpd line is added per port.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixRelay:
    """One Postfix instance relaying everything it accepts to ``relayhost``."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: str = "127.0.0.1",
        port: int,
        relayhost: str,
        hostname: str = "relay.test",
        sasl_socket: Path | None = None,
        tls_chain_file: Path | None = None,
        require_auth: bool = True,
        main_cf: Mapping[str, str] | None = None,
    ) -> None:
        """``relayhost`` is Postfix syntax, e.g. ``[127.0.0.1]:2526``. ``listen`` must be an
        address assigned to an interface (Postfix checks): 127.0.0.1, or one added with
        ``ip addr add 127.0.0.x/32 dev lo``. ``tls_chain_file`` is one PEM with the private key
        followed by the certificate chain (``smtpd_tls_chain_files``). ``main_cf`` adds or
        replaces main.cf parameters (e.g. ``smtpd_recipient_restrictions`` for a test)."""
        if require_auth and sasl_socket is None:
            raise LabError("require_auth needs a sasl_socket (Dovecot's auth socket)")
        self.workdir = traversable_workdir(Path(workdir))
        self.listen = listen
        self.port = port
        self.relayhost = relayhost
        self.hostname = hostname
        self.sasl_socket = sasl_socket
        self.tls_chain_file = tls_chain_file
        self.require_auth = require_auth
        self.extra_main_cf = dict(main_cf or {})
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "maillog"
        self._write_config()

    # -- configuration -------------------------------------------------------------------

    def _write_config(self) -> None:
        # Postfix creates the tree under the queue directory itself with the owners it needs;
        # a pre-created root-owned private/ would make it refuse to start.
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        (self.config_dir / "main.cf").write_text(self._main_cf())
        smtpd = f"{self.port}      inet  n       -       n       -       -       smtpd\n"
        (self.config_dir / "master.cf").write_text(smtpd + _MASTER_SERVICES)
        for name in ("dynamicmaps.cf",):
            source = DEFAULT_CONFIG_DIR / name
            if source.exists():
                shutil.copy(source, self.config_dir / name)

    def _main_cf(self) -> str:
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": self.listen,
            "inet_protocols": "ipv4",
            "relayhost": self.relayhost,
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "smtpd_banner": "$myhostname ESMTP Postfix",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "no",
            # The onward hop is a test sink: plain SMTP, retried quickly when it is down.
            "smtp_tls_security_level": "none",
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
        }
        if self.require_auth:
            lines |= {
                "mynetworks": "",
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": str(self.sasl_socket),
                "smtpd_tls_auth_only": "yes",
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            }
        else:
            lines |= {
                "mynetworks": "127.0.0.0/8",
                "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            }
        if self.tls_chain_file is not None:
            lines |= {
                "smtpd_tls_security_level": "may",
                "smtpd_tls_chain_files": str(self.tls_chain_file),
                "smtpd_tls_loglevel": "1",
            }
        else:
            lines["smtpd_tls_security_level"] = "none"
        lines |= self.extra_main_cf
        return "".join(f"{key} = {value}\n" for key, value in lines.items())

    # -- registration in the default main.cf ---------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _locked_default_main_cf() -> Iterator[Path]:
        main_cf = DEFAULT_CONFIG_DIR / "main.cf"
        with (DEFAULT_CONFIG_DIR / ".deliverd-lab.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not main_cf.exists():
                if not DEBIAN_MAIN_CF.exists():
                    raise LabError(f"{main_cf} is missing and there is no {DEBIAN_MAIN_CF}")
                shutil.copy(DEBIAN_MAIN_CF, main_cf)
            yield main_cf

    def _set_registration(self, present: bool) -> None:
        """Add or remove our config dir in ``alternate_config_directories`` (idempotent)."""
        with self._locked_default_main_cf() as main_cf:
            text = main_cf.read_text()
            pattern = re.compile(rf"^{_ALT_DIRS}\s*=(.*(?:\n[ \t]+.*)*)$", re.MULTILINE)
            match = pattern.search(text)
            dirs = match.group(1).replace(",", " ").split() if match else []
            mine = str(self.config_dir)
            wanted = [d for d in dirs if d != mine] + ([mine] if present else [])
            if wanted == dirs:
                return
            line = f"{_ALT_DIRS} = {' '.join(wanted)}"
            if match:
                text = text[: match.start()] + line + text[match.end():]
            else:
                text = text.rstrip("\n") + "\n" + line + "\n"
            tmp = main_cf.with_name(f".main.cf.{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(main_cf)

    # -- lifecycle -----------------------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("postfix") or "/usr/sbin/postfix"
        # postfix(1) reports fatal errors only to a terminal or the mail log: give it one.
        command = " ".join([binary, "-c", str(self.config_dir), *args])
        return subprocess.run(
            ["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
            check=False, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int | None:
        return read_pid(self.queue_dir / "pid" / "master.pid")

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise LabError("postfix is not installed")
        self._set_registration(True)
        done = self._postfix("start", timeout=timeout)
        if done.returncode != 0:
            self._set_registration(False)
            raise LabError(
                f"postfix failed to start ({done.returncode}): {done.stdout.strip()}\n"
                f"{self.log_text()}"
            )
        wait_for_port(self.listen, self.port, timeout, "postfix smtpd")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Postfix and every process it started; safe to call twice."""
        pid = self.pid
        if pid is not None and pid_alive(pid):
            self._postfix("stop", timeout=timeout)
            if not wait_gone(pid, timeout):
                self._postfix("abort", timeout=timeout)
                terminate(pid, 5.0)
        # Workers (smtpd, qmgr, smtp...) outlive the master by a moment; none may survive
        # into the next test holding the port or the queue.
        reap(processes_with_env("MAIL_CONFIG", str(self.config_dir)))
        self._set_registration(False)

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now."""
        self._postfix("flush")

    def __enter__(self) -> PostfixRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sasl_users(self) -> list[str]:
        """Every ``sasl_username`` that authenticated successfully, in log order."""
        return [m["user"] for m in _SASL_USER.finditer(self.log_text())]
