"""What the lab servers share: readiness polling, process teardown, work directory checks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import time
from pathlib import Path


class LabError(RuntimeError):
    """A lab server could not be configured, started or stopped; the message says why."""


def wait_for_port(address: str, port: int, timeout: float, what: str) -> None:
    """Return once ``address:port`` accepts a TCP connection; ``LabError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
            return
        time.sleep(0.05)
    raise LabError(f"{what} did not answer on {address}:{port} within {timeout:.0f}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose: it holds no port and no socket.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL when ``pid`` lingers: teardown must always finish."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, timeout):
            return


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc): server workers to reap after their master."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def traversable_workdir(workdir: Path) -> Path:
    """Create ``workdir`` (0755) and check that unprivileged server users can reach it.

    Postfix and Dovecot drop privileges (postfix, dovecot, dovenull) and then open sockets and
    files under the work directory; a 0700 parent such as pytest's ``tmp_path`` makes them
    fail in ways that only show up deep in their logs, so refuse such a directory up front.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    for parent in workdir.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise LabError(
                f"{parent} is not searchable by other users (mode {stat.filemode(mode)}); "
                "put lab work directories under a world-searchable directory such as "
                "tempfile.mkdtemp()'s default"
            )
    return workdir


def processes_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment has ``name=value``: how a server marks its own workers
    (Postfix's master exports MAIL_CONFIG to every child), so stray ones can be found."""
    wanted = f"{name}={value}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def reap(pids: list[int], grace: float = 3.0) -> None:
    """Let ``pids`` exit on their own for ``grace`` seconds, then kill the ones still there."""
    deadline = time.monotonic() + grace
    for pid in pids:
        if not wait_gone(pid, max(0.0, deadline - time.monotonic())):
            terminate(pid, 2.0)
