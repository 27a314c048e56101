"""``deliverd run -c FILE``: the delivery daemon, in the foreground or detached.

``--daemonize`` is the supervised-process mode for hosts without systemd (the Ansible role's
fallback): the command returns only once the detached daemon listens (exit 0) or has died
trying (exit 1), so whoever started it learns about a failed start at once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import socket
import sys
import time
from pathlib import Path

from deliverd import daemon
from deliverd.config.loader import ConfigError, load_config
from deliverd.submission.sockets import bind_privileged

READY_TIMEOUT = 30.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the delivery daemon in the foreground")
    p.add_argument("-c", "--config", type=Path, default=Path("/etc/deliverd/deliverd.toml"))
    p.add_argument("--secrets", type=Path, default=None,
                   help="secrets file (default: secrets.toml beside the config)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--stop-grace", type=float, default=daemon.STOP_GRACE, metavar="SECONDS",
                   help="on SIGTERM, let in-flight deliveries finish this long, then requeue them")
    p.add_argument("--log-file", type=Path, default=None,
                   help="append the log to this file instead of stderr")
    p.add_argument("--pid-file", type=Path, default=None,
                   help="write the daemon's pid here; removed when it stops")
    p.add_argument("--user", default=None,
                   help="run as this user (and its group) instead of the invoking one")
    p.add_argument("--daemonize", action="store_true",
                   help="detach; return once the daemon listens (0) or failed to start (1)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.daemonize:
        return _start_detached(args)
    prebound = _prepare_process(args)
    return daemon.run(
        args.config, args.secrets, args.log_format, args.log_level, stop_grace=args.stop_grace,
        prebound=prebound,
    )


def _prepare_process(args: argparse.Namespace) -> dict[tuple[str, int], socket.socket]:
    """Log file, pid file, listening sockets on ports below 1024, then the user switch: all
    opened with the invoking rights (bind-then-drop, for a listener on port 25 without
    systemd's capability). Returns the sockets bound."""
    if args.log_file is not None:
        fd = os.open(args.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if args.pid_file is not None:
        _write_pid_file(args.pid_file)
    prebound: dict[tuple[str, int], socket.socket] = {}
    if args.user is not None and os.geteuid() == 0:
        prebound = _bind_privileged(args)
    if args.user is not None:
        _become(args.user)
    return prebound


def _bind_privileged(args: argparse.Namespace) -> dict[tuple[str, int], socket.socket]:
    try:
        cfg = load_config(args.config, args.secrets)
    except ConfigError:
        return {}  # the daemon loads it again and reports every problem
    try:
        return bind_privileged(cfg.listen)
    except OSError as exc:
        print(f"deliverd: cannot listen: {exc}", file=sys.stderr)
        sys.exit(1)


def _write_pid_file(path: Path) -> None:
    pid = os.getpid()
    path.write_text(f"{pid}\n", encoding="ascii")

    def remove() -> None:
        # Only our own: a newer daemon may already have replaced the file.
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text(encoding="ascii")) == pid:
                path.unlink()

    atexit.register(remove)


def _become(user: str) -> None:
    entry = pwd.getpwnam(user)
    if os.getuid() == entry.pw_uid:
        return
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _start_detached(args: argparse.Namespace) -> int:
    """Double fork; the original process waits for the daemon's readiness pid file."""
    try:
        # Load once here so that a bad config fails the start with its message, synchronously.
        queue_path = Path(load_config(args.config, args.secrets).queue.path)
    except ConfigError as exc:
        print(f"deliverd: {exc}", file=sys.stderr)
        return 1
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            pid_text = pipe.read().decode("ascii").strip()
        os.wait()  # the intermediate child exits at once
        if not pid_text:
            print("deliverd: the daemon process could not be started", file=sys.stderr)
            return 1
        return _wait_ready(int(pid_text), queue_path / daemon.PID_NAME, args.log_file)
    os.close(read_end)
    os.setsid()  # no controlling terminal: a closed ssh session must not stop the daemon
    if os.fork() > 0:
        os._exit(0)
    os.write(write_end, f"{os.getpid()}".encode("ascii"))
    os.close(write_end)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if args.log_file is None:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)
    os.chdir("/")
    prebound = _prepare_process(args)
    code = daemon.run(
        args.config, args.secrets, args.log_format, args.log_level, stop_grace=args.stop_grace,
        prebound=prebound,
    )
    sys.exit(code)


def _wait_ready(pid: int, ready_file: Path, log_file: Path | None) -> int:
    """0 once ``ready_file`` names ``pid`` (the daemon listens), 1 if it dies or never does."""
    where = f"; see {log_file}" if log_file is not None else ""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if int(ready_file.read_text(encoding="ascii")) == pid:
                print(f"deliverd: started, pid {pid}")
                return 0
        if not _alive(pid):
            print(f"deliverd: the daemon exited during start-up{where}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"deliverd: the daemon (pid {pid}) is not ready after {READY_TIMEOUT:.0f}s{where}",
          file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    """Whether pid runs; a zombie (not yet reaped by init) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"
