"""Mail servers run from their unpacked Debian packages, beside the machine's own Postfix.

Debian's MTA packages (exim4, opensmtpd, nullmailer, dma, msmtp-mta) conflict with one another
and with postfix: installing one removes the machine's MTA. So the lab never installs them:
``unpack`` fetches the .deb files with ``apt-get download`` and extracts them with
``dpkg-deb -x`` into a cache directory, and ``isolated`` runs a server from there in a private
mount namespace (``unshare -m``) where

- ``/etc/passwd`` and ``/etc/group`` are copies with the server's compiled-in users added
  (``Debian-exim``, ``opensmtpd``...), so no user is added to the machine;
- directories the binary has compiled in (``/usr/sbin/exim4`` which Exim re-executes, the spool
  ``/var/spool/smtpd``) are read-only overlays or bind mounts of the work directory, visible to
  that process tree only.

Nothing outside the cache and the work directory is written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deliverd_lab.common import LabError
from deliverd_lab.served import ForegroundServer

LIB_DIR = "/usr/lib/x86_64-linux-gnu"
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_SPAN_SCALE = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def span_seconds(text: str) -> float:
    """A duration the way Exim (``QT=1m2.5s``) and OpenSMTPD (``delay=1d2h``) log it."""
    return sum(float(n) * _SPAN_SCALE[unit] for n, unit in _SPAN_PART.findall(text))


def unpack(cache: Path, packages: Sequence[str], timeout: float = 300.0) -> Path:
    """Download and extract ``packages`` (once) into ``cache``; return the extraction root."""
    debs = cache / "debs"
    root = cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for package in packages:
        marker = root / ".unpacked" / package
        if marker.exists():
            continue
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            done = subprocess.run(["apt-get", "download", package], cwd=debs,
                                  capture_output=True, text=True, timeout=timeout, check=False)
            found = sorted(debs.glob(f"{package}_*.deb"))
            if done.returncode != 0 or not found:
                raise LabError(f"apt-get download {package} failed: {done.stderr.strip()}")
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True,
                       timeout=timeout)
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    return root


@dataclass(frozen=True)
class User:
    name: str
    uid: int

    def passwd(self) -> str:
        return f"{self.name}:x:{self.uid}:{self.uid}::/nonexistent:/usr/sbin/nologin\n"

    def group(self) -> str:
        return f"{self.name}:x:{self.uid}:\n"


@dataclass
class Isolation:
    """How one server process tree sees the file system (see the module docstring)."""

    workdir: Path
    users: Sequence[User] = ()
    binds: dict[str, Path] = field(default_factory=dict)  # target -> source directory
    overlays: dict[str, Path] = field(default_factory=dict)  # target -> extra lower dir

    def command(self, argv: Sequence[str]) -> list[str]:
        steps: list[str] = []
        if self.users:
            for name in ("passwd", "group"):
                copy = self.workdir / name
                text = Path(f"/etc/{name}").read_text()
                extra = "".join(u.passwd() if name == "passwd" else u.group() for u in self.users)
                copy.write_text(text + extra)
                copy.chmod(0o644)
                steps.append(f"mount --bind {shlex.quote(str(copy))} /etc/{name}")
        for target, lower in self.overlays.items():
            options = f"lowerdir={lower}:{target}"
            steps.append(f"mount -t overlay overlay -o {shlex.quote(options)} {target}")
        for target, source in self.binds.items():
            steps.append(f"mount --bind {shlex.quote(str(source))} {target}")
        steps.append("exec " + shlex.join(argv))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                " && ".join(steps)]


def uid_owned(path: Path, user: User) -> None:
    """``chown -R`` to a user that exists only inside the namespace (numeric ids)."""
    subprocess.run(["chown", "-R", f"{user.uid}:{user.uid}", str(path)], check=True)


class UnpackedRelay(ForegroundServer):
    """A relay run from its unpacked packages, in its own world-readable work directory."""

    packages: tuple[str, ...] = ()

    def __init__(self, workdir: Path, cache: Path, *, listen: str, port: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        super().__init__(workdir / "daemon.out", listen, port)
        self.root = unpack(cache, self.packages)
