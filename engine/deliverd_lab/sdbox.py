"""A Debian 12 container whose PID 1 is systemd, on a host whose own PID 1 is not.

``build`` debootstraps a minimal bookworm root (systemd, dbus, python3) from the Debian mirror the
machine's apt already uses; ``start`` boots it with systemd-nspawn and returns once systemd reports
``running`` (or ``degraded``); ``exec_argv`` enters every namespace of the container's PID 1 with
nsenter; ``stop`` powers it off and removes what nspawn leaves behind. ``run_unbooted`` runs one
command in the root without booting it (the command is PID 1, as in most containers): systemd is
installed there but not running.

nspawn needs ``--register=no --keep-unit`` without a running systemd on the host (there is no
system bus to register with), and it is started from a cgroup of its own, removed at ``stop``, so
its supervisor and payload cgroups never land in the host's root cgroup. The PIDs of a running
container are kept in ``STATE_DIR`` under its name, so another process (or the command line) can
enter or stop it.

Run as root: ``python -m deliverd_lab.sdbox build ROOT | start ROOT NAME | exec NAME CMD... |
stop NAME | run ROOT CMD...``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from deliverd_lab.common import LabError, children_of, pid_alive, read_pid, terminate

SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
HOSTNAME = "sdbox"
STATE_DIR = Path("/run/deliverd-sdbox")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_BASE = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")
BOOTED_STATES = ("running", "degraded")
APT_SOURCES = Path("/etc/apt")

# nspawn processes started by this process, reaped at stop (they are our children).
_spawned: dict[str, subprocess.Popen[bytes]] = {}


# -- the Debian mirror ------------------------------------------------------------------------


def mirror_from_sources(texts: Iterable[str], suite: str = SUITE) -> str | None:
    """The archive URI that serves ``suite`` itself (not -security or -updates) in apt source
    texts, one-line (``deb URI SUITE ...``) or deb822 (``URIs:`` / ``Suites:`` stanzas)."""
    for text in texts:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                rest = [w for w in words[1:] if not w.startswith("[")]
                if len(rest) >= 2 and rest[1] == suite:
                    return rest[0]
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ")):
                    fields[key.strip().lower()] = value.strip()
            types = fields.get("types", "deb").split()
            if suite in fields.get("suites", "").split() and "deb" in types:
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0]
    return None


def debian_mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The mirror this machine's apt uses for the suite (read now, never stored)."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    texts = [f.read_text(errors="replace") for f in files if f.is_file()]
    mirror = mirror_from_sources(texts)
    if mirror is None:
        raise LabError(f"no apt source for {SUITE} under {apt_dir}: cannot pick a mirror")
    return mirror


# -- building the root ------------------------------------------------------------------------


def _require(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None and shutil.which(program, path="/usr/sbin:/sbin") is None:
            raise LabError(f"{program} is not installed (Debian packages debootstrap and "
                           "systemd-container)")


def build(root: Path, packages: Sequence[str] = BASE_PACKAGES, mirror: str | None = None,
          variant: str = "minbase") -> None:
    """debootstrap ``root`` (about a minute, about 300 MB)."""
    _require("debootstrap")
    argv = ["debootstrap", f"--variant={variant}"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    done = subprocess.run([*argv, SUITE, str(root), mirror or debian_mirror()],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"debootstrap of {root} failed:\n{done.stdout[-3000:]}{done.stderr}")
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")


# -- own cgroup -------------------------------------------------------------------------------


def cgroup_dirs(name: str, cgroup_root: Path = CGROUP_ROOT) -> list[Path]:
    """The container's own cgroup in every hierarchy systemd uses: the unified (v2) one, and on
    a hybrid host also the named v1 ``systemd`` one."""
    leaf = f"sdbox-{name}"
    if (cgroup_root / "cgroup.controllers").exists():  # pure v2
        return [cgroup_root / leaf]
    return [cgroup_root / h / leaf for h in ("unified", "systemd") if (cgroup_root / h).is_dir()]


def _enter_cgroups(dirs: Sequence[Path]) -> Callable[[], None]:
    for directory in dirs:
        directory.mkdir(exist_ok=True)

    def enter() -> None:  # runs in the child, before exec
        for directory in dirs:
            (directory / "cgroup.procs").write_text(str(os.getpid()))

    return enter


def _remove_cgroups(dirs: Sequence[Path]) -> None:
    for top in dirs:
        if not top.is_dir():
            continue
        # Deepest first: a cgroup can only go once its children have.
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


# -- booted containers ------------------------------------------------------------------------


def _state(name: str, kind: str) -> Path:
    return STATE_DIR / f"{name}.{kind}"


def start(root: Path, name: str, *, volatile: str | None = None,
          nspawn_args: Sequence[str] = (), timeout: float = 30.0) -> int:
    """Boot ``root`` as container ``name`` (own network namespace: only its loopback);
    the container's init PID, once systemd is up."""
    _require("systemd-nspawn", "nsenter")
    if is_running(name):
        raise LabError(f"container {name} is already running")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    argv = [*NSPAWN_BASE, "--directory", str(root), "--machine", name, "--private-network",
            *([f"--volatile={volatile}"] if volatile else []), *nspawn_args,
            "--boot", "--console=pipe"]
    with _state(name, "log").open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True,
                                preexec_fn=_enter_cgroups(cgroup_dirs(name)))
    _spawned[name] = proc
    _state(name, "nspawn.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        children = children_of(proc.pid)  # nspawn's one child is the container's init
        init = children[0] if children else None
        if init is not None and _system_state(init) in BOOTED_STATES:
            _state(name, "init.pid").write_text(f"{init}\n")
            return init
        time.sleep(0.2)
    log_text = _state(name, "log").read_text(errors="replace")
    stop(name)
    raise LabError(f"container {name} did not boot within {timeout:.0f}s:\n{log_text[-4000:]}")


def _system_state(init: int) -> str:
    done = subprocess.run(["nsenter", "-t", str(init), "-a", "systemctl", "is-system-running"],
                          capture_output=True, text=True, check=False, timeout=10)
    return done.stdout.strip()


def init_pid(name: str) -> int:
    pid = read_pid(_state(name, "init.pid"))
    if pid is None or not pid_alive(pid):
        raise LabError(f"container {name} is not running")
    return pid


def is_running(name: str) -> bool:
    with contextlib.suppress(LabError):
        init_pid(name)
        return True
    return False


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside the running container ``name``. nsenter
    passes the caller's environment on: prefix ``env -i ...`` for a clean one."""
    return ["nsenter", "-t", str(init_pid(name)), "-a", *argv]


def stop(name: str, timeout: float = 20.0) -> None:
    """Power ``name`` off (SIGKILL after ``timeout``) and clean up; safe when not running."""
    nspawn = read_pid(_state(name, "nspawn.pid"))
    init = read_pid(_state(name, "init.pid"))
    if init is not None and pid_alive(init):
        subprocess.run(["nsenter", "-t", str(init), "-a", "systemctl", "poweroff"],
                       capture_output=True, check=False, timeout=30)
    if nspawn is not None:
        deadline = time.monotonic() + timeout
        while pid_alive(nspawn) and time.monotonic() < deadline:
            time.sleep(0.2)
        terminate(nspawn, 5.0)
    spawned = _spawned.pop(name, None)
    if spawned is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spawned.wait(timeout=5)
    _cleanup(name)
    for kind in ("nspawn.pid", "init.pid", "log"):
        _state(name, kind).unlink(missing_ok=True)


# -- unbooted ---------------------------------------------------------------------------------


def unbooted_argv(root: Path, name: str, argv: Sequence[str],
                  nspawn_args: Sequence[str] = ()) -> list[str]:
    """nspawn running ``argv`` as PID 1 of ``root`` (no boot; stdin/stdout passed through)."""
    return [*NSPAWN_BASE, "--directory", str(root), "--machine", name, "--pipe", *nspawn_args,
            "--", *argv]


def _cleanup(name: str) -> None:
    _remove_cgroups(cgroup_dirs(name))
    # nspawn leaves its mount propagation directory behind on exit.
    shutil.rmtree(Path("/run/systemd/nspawn/propagate") / name, ignore_errors=True)


def run_unbooted(root: Path, argv: Sequence[str], nspawn_args: Sequence[str] = (), *,
                 capture: bool = True,
                 timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``root`` without booting it, from a cgroup of its own (removed after);
    ``capture=False`` passes this process's stdin, stdout and stderr through."""
    _require("systemd-nspawn")
    name = f"run-{os.getpid()}-{time.monotonic_ns()}"
    try:
        return subprocess.run(unbooted_argv(root, name, argv, nspawn_args),
                              capture_output=capture, text=True, check=False, timeout=timeout,
                              stdin=subprocess.DEVNULL if capture else None,
                              preexec_fn=_enter_cgroups(cgroup_dirs(name)))
    finally:
        _cleanup(name)


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deliverd_lab.sdbox",
                                     description="a systemd Debian container (root only)")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("build", help="debootstrap a bookworm root")
    p.add_argument("root", type=Path)
    p.add_argument("--include", action="append", default=[], metavar="PACKAGE",
                   help="another Debian package for the root (repeatable)")
    p = sub.add_parser("start", help="boot ROOT as container NAME")
    p.add_argument("root", type=Path)
    p.add_argument("name")
    p.add_argument("--volatile", choices=("overlay", "state", "yes"),
                   help="throw changes away at shutdown (overlay: all of them)")
    p.add_argument("--nspawn-arg", action="append", default=[], metavar="ARG",
                   help="another systemd-nspawn option, e.g. --bind-ro=SRC:DST (repeatable)")
    p = sub.add_parser("exec", help="run CMD inside the running container NAME")
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("stop", help="power NAME off and clean up")
    p.add_argument("name")
    p = sub.add_parser("run", help="run CMD in ROOT without booting it")
    p.add_argument("root", type=Path)
    p.add_argument("--nspawn-arg", action="append", default=[], metavar="ARG",
                   help="another systemd-nspawn option (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "build":
            build(args.root, (*BASE_PACKAGES, *args.include))
        elif args.action == "start":
            init = start(args.root, args.name, volatile=args.volatile,
                         nspawn_args=args.nspawn_arg)
            print(f"{args.name}: booted, init pid {init}")
        elif args.action == "exec":
            return subprocess.run(exec_argv(args.name, args.command or ["/bin/bash"]),
                                  check=False).returncode
        elif args.action == "stop":
            stop(args.name)
        else:
            return run_unbooted(args.root, args.command or ["/bin/bash"], args.nspawn_arg,
                                capture=False).returncode
    except LabError as exc:
        print(f"sdbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
