"""bench/sendmail: N invocations of ``sendmail -t -i`` per MTA into a smart host sink.

For each MTA: its own instance relaying to a fresh smtp-sink (loopback), then N invocations one
after another and N more, 8 at a time. Per phase: per-invocation wall time p50/p99,
invocations/s and the time until the sink has every message. The sendmail programs:

- deliverd: its ``sendmail`` launcher (``python -I -S``, as the role's wrapper) into the running
  daemon's maildrop;
- postfix: the machine's ``/usr/sbin/sendmail`` with ``-C`` the lab instance's config dir
  (postdrop -> pickup);
- exim: the unpacked ``exim4 -C CONF -t -i`` (background delivery), run through the namespace
  that gives it its user and its re-exec path (``deliverd_lab.unpacked``);
- dma: the unpacked ``dma -t -i`` with its /etc/dma/dma.conf overlaid in a mount namespace;
- msmtp: the unpacked ``msmtp -C CONF -t`` (no queue: it talks SMTP to the sink itself);
- nullmailer: its ``sendmail`` -> ``nullmailer-inject`` -> ``nullmailer-queue`` into the queue
  that ``nullmailer-send`` (running as mail) delivers from; both in namespaces that see the
  same /var/spool/nullmailer and /etc/nullmailer (the compiled-in paths), with the unpacked
  /usr/bin, /usr/sbin and /usr/lib overlaid;
- opensmtpd: its ``smtpctl`` as ``sendmail`` (setgid opensmtpq, as the package installs it),
  in a namespace with the daemon's /run and /var/spool, so it reaches the daemon's socket.

Exim's, dma's, nullmailer's and OpenSMTPD's figures include ``unshare`` + ``sh`` + the mounts,
a few ms per call.

``--config-reader``: what reading the config costs a ``sendmail`` run, the way every run reads it
(``read_sendmail_settings``: its scanner of the rendered TOML) against the ``tomllib``
parse the same function falls back to, each in a fresh ``python -I -S`` as the launcher starts
it, alternately so load drifts hit both alike: the reason the scanner is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _relay import CACHE, LOOPBACK, Deliverd, Postfix, Sink, free_port
from _stats import percentile, table

from deliverd.cli.sendmail import launcher
from deliverd_lab.common import LabError
from deliverd_lab.exim import EximRelay
from deliverd_lab.opensmtpd import USERS as OPENSMTPD_USERS
from deliverd_lab.opensmtpd import OpenSmtpdRelay
from deliverd_lab.unpacked import LIB_DIR, Isolation, unpack

ENGINE = Path(__file__).resolve().parent.parent / "engine"
MTAS = ("deliverd", "postfix", "exim", "dma", "msmtp", "nullmailer", "opensmtpd")
NOT_WIRED: dict[str, str] = {}
MESSAGE = (b"From: bench@source.test\nTo: sink@dest.test\nSubject: sendmail bench\n\n"
           b"one line of body\n")


@dataclass
class Target:
    argv: list[str]
    env: dict[str, str]
    queue_empty: Callable[[], bool]


# The interpreter a host's deliverd venv runs (the role's deliverd_python): the launcher starts
# it on every call, so its start-up is most of deliverd's figure. --python picks another.
HOST_PYTHON = "/usr/bin/python3"


def default_python() -> str:
    """Debian's python3 when it is this interpreter's minor version (the host's case), else
    the interpreter running the bench."""
    if Path(HOST_PYTHON).exists():
        probe = subprocess.run([HOST_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == str(sys.version_info[:2]):
            return HOST_PYTHON
    return sys.executable


@contextlib.contextmanager
def target(kind: str, workdir: Path, sink_port: int,
           python: str = sys.executable) -> Iterator[Target]:
    env = dict(os.environ)
    if kind == "deliverd":
        mta = Deliverd(workdir, sink_port, {"max_sessions": 30})
        script = workdir / "sendmail"
        # The role's wrapper: python -I -S with the package (here the checkout's) on sys.path.
        script.write_text(launcher(python, [str(ENGINE), *site.getsitepackages()],
                                   "sendmail"))
        script.chmod(0o755)
        env["DELIVERD_CONFIG"] = str(workdir / "etc" / "deliverd.toml")
        mta.start()
        try:
            yield Target([str(script), "-t", "-i"], env, mta.queue_empty)
        finally:
            mta.stop()
    elif kind == "postfix":
        pf = Postfix(workdir, sink_port)
        pf.start()
        try:
            yield Target(["/usr/sbin/sendmail", "-C", str(pf.relay.config_dir), "-t", "-i"],
                         env, pf.queue_empty)
        finally:
            pf.stop()
    elif kind == "exim":
        exim = EximRelay(workdir / "exim", CACHE, listen=LOOPBACK, port=free_port(),
                         smarthost=LOOPBACK, smarthost_port=sink_port)
        exim.start()
        isolation = Isolation(exim.workdir, users=[], overlays={
            "/usr/sbin": exim.root / "usr/sbin", LIB_DIR: exim.root / LIB_DIR.lstrip("/")},
            binds={"/etc/passwd": exim.workdir / "passwd", "/etc/group": exim.workdir / "group"})
        try:
            yield Target(isolation.command(["/usr/sbin/exim4", "-C", str(exim.config_path),
                                            "-t", "-i"]), env, exim.queue_empty)
        finally:
            exim.stop()
    elif kind == "dma":
        root = unpack(CACHE, ("dma",))
        spool = workdir / "dma-spool"
        spool.mkdir()
        subprocess.run(["chgrp", "mail", str(spool)], check=True)
        spool.chmod(0o2775)
        (workdir / "etc" / "dma").mkdir(parents=True)
        (workdir / "etc" / "dma" / "dma.conf").write_text(
            f"SMARTHOST {LOOPBACK}\nPORT {sink_port}\nSPOOLDIR {spool}\nMAILNAME dma.bench\n")
        isolation = Isolation(workdir, overlays={"/etc": workdir / "etc"})
        yield Target(isolation.command([str(root / "usr/sbin/dma"), "-t", "-i"]), env,
                     lambda: not any(spool.iterdir()))
    elif kind == "msmtp":
        root = unpack(CACHE, ("msmtp", "libgsasl18", "libsecret-1-0", "libntlm0",
                              "libgssglue1"))
        conf = workdir / "msmtprc"
        conf.write_text(f"account default\nhost {LOOPBACK}\nport {sink_port}\n"
                        "from bench@source.test\nauth off\ntls off\n")
        conf.chmod(0o600)
        env["LD_LIBRARY_PATH"] = str(root / LIB_DIR.lstrip("/"))
        yield Target([str(root / "usr/bin/msmtp"), "-C", str(conf), "-t"], env, lambda: True)
    elif kind == "nullmailer":
        with nullmailer(workdir, sink_port) as t:
            yield t
    elif kind == "opensmtpd":
        osmtpd = OpenSmtpdRelay(workdir / "opensmtpd", CACHE, listen=LOOPBACK, port=free_port(),
                                smarthost=LOOPBACK, smarthost_port=sink_port)
        osmtpd.start()
        sendmail = workdir / "sendmail"
        shutil.copy(osmtpd.root / "usr/sbin/smtpctl", sendmail)
        os.chown(sendmail, 0, OPENSMTPD_USERS[1].uid)
        sendmail.chmod(0o2555)
        isolation = Isolation(osmtpd.workdir, users=OPENSMTPD_USERS,
                              binds={"/var/spool": osmtpd.spool, "/run": osmtpd.run})
        try:
            yield Target(isolation.command([str(sendmail), "-t", "-i"]), env,
                         osmtpd.queue_empty)
        finally:
            osmtpd.stop()
    else:
        raise LabError(NOT_WIRED.get(kind, f"unknown MTA {kind}"))


@contextlib.contextmanager
def nullmailer(workdir: Path, sink_port: int) -> Iterator[Target]:
    root = unpack(CACHE / "nullmailer", ("nullmailer",))  # its own sendmail, not another's
    spool = workdir / "spool" / "nullmailer"
    for name in ("queue", "tmp", "failed"):
        (spool / name).mkdir(parents=True)
    os.mkfifo(spool / "trigger")
    subprocess.run(["chown", "-R", "mail:mail", str(spool)], check=True)
    etc = workdir / "etc"
    (etc / "nullmailer").mkdir(parents=True)
    (etc / "nullmailer" / "remotes").write_text(f"{LOOPBACK} smtp --port={sink_port}\n")
    (etc / "nullmailer" / "defaultdomain").write_text("nullmailer.bench\n")
    (etc / "mailname").write_text("nullmailer.bench\n")
    isolation = Isolation(workdir, binds={"/var/spool": workdir / "spool"}, overlays={
        "/etc": etc, "/usr/sbin": root / "usr/sbin", "/usr/lib": root / "usr/lib",
        "/usr/bin": root / "usr/bin"})
    with (workdir / "nullmailer-send.log").open("wb") as log:
        daemon = subprocess.Popen(isolation.command(
            ["setpriv", "--reuid", "mail", "--regid", "mail", "--clear-groups",
             str(root / "usr/sbin/nullmailer-send")]), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Target(isolation.command([str(root / "usr/sbin/sendmail"), "-t", "-i"]),
                     dict(os.environ), lambda: not any((spool / "queue").iterdir()))
    finally:
        daemon.terminate()
        daemon.wait(10)


def invoke(t: Target) -> float:
    t0 = time.monotonic()
    done = subprocess.run(t.argv, input=MESSAGE, env=t.env, capture_output=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        raise LabError(f"{t.argv[0]} exited {done.returncode}: "
                       f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return time.monotonic() - t0


def phase(t: Target, sink: Sink, n: int, parallel: int, want: int) -> dict[str, Any]:
    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        times = list(pool.map(lambda _i: invoke(t), range(n)))
    t_calls = time.monotonic() - t0
    deadline = time.monotonic() + max(60, n)
    while not (sink.count() >= want and t.queue_empty()):
        if time.monotonic() > deadline:
            raise LabError(f"sink has {sink.count()}/{want}")
        time.sleep(0.01)
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "calls_per_s": n / t_calls, "all_delivered_s": time.monotonic() - t0}


def run_mta(kind: str, base: Path, n: int, python: str = sys.executable) -> list[dict[str, Any]]:
    workdir = base / kind
    workdir.mkdir()
    workdir.chmod(0o755)
    sink = Sink(workdir)
    rows = []
    try:
        with target(kind, workdir, sink.port, python) as t:
            time.sleep(0.5)
            for parallel, want in ((1, n), (8, 2 * n)):
                row = {"mta": kind, "parallel": parallel,
                       **phase(t, sink, n, parallel, want)}
                rows.append(row)
                print(f"{kind:9s} x{parallel}: p50 {row['p50_ms']:.1f} ms, "
                      f"{row['calls_per_s']:.0f} calls/s", flush=True)
        time.sleep(0.3)
        if sink.count() != 2 * n:
            raise LabError(f"sink counted {sink.count()}, expected {2 * n}")
    finally:
        sink.stop()
    return rows


# What --config-reader runs in each fresh interpreter: the import of the reader and one read,
# timed inside the process (start-up excluded), and the modules it loaded.
_READ_CONFIG = """\
import sys, time
sys.path += {paths!r}
started = time.perf_counter()
from deliverd.config.config_file import {imports}
settings = {call}
took = time.perf_counter() - started
print(took * 1000, len(sys.modules))
"""
CONFIG_READERS = {
    "scanner (read_sendmail_settings)": ("read_sendmail_settings",
                                         "read_sendmail_settings({path!r})"),
    "tomllib (parse_toml + settings_from_tree)": (
        "settings_from_tree\nfrom deliverd.config.config_file import read_toml",
        "settings_from_tree({path!r}, read_toml({path!r}))"),
}


def config_reader(python: str, rounds: int) -> list[dict[str, Any]]:
    """Each reader ``rounds`` times, alternately, in a fresh ``python -I -S``."""
    from deliverd.spec.normalise import normalise
    from deliverd.spec.render import write_rendered

    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in CONFIG_READERS}
    with tempfile.TemporaryDirectory(prefix="deliverd-config-reader-") as tmp:
        write_rendered(normalise({"version": 1, "host": {"name": "bench.example"}}), Path(tmp))
        path = str(Path(tmp) / "deliverd.toml")
        for _ in range(rounds):
            for name, (imports, call) in CONFIG_READERS.items():
                code = _READ_CONFIG.format(paths=[str(ENGINE)], imports=imports,
                                           call=call.format(path=path))
                started = time.perf_counter()
                done = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True,
                                      text=True, check=True)
                wall = (time.perf_counter() - started) * 1000
                inside, modules = done.stdout.split()
                samples[name].append((wall, float(inside), int(modules)))
    return [{"reader": name, "wall_p50_ms": percentile([s[0] for s in got], 50),
             "read_p50_ms": percentile([s[1] for s in got], 50), "modules": got[-1][2]}
            for name, got in samples.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/sendmail", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--invocations", type=int, default=200,
                   help="invocations per phase (sequential, then 8 in parallel)")
    p.add_argument("--mtas", default=",".join(MTAS))
    p.add_argument("--python", default=None,
                   help="the interpreter deliverd's sendmail launcher runs (default: Debian's "
                        "python3 when it is this Python's minor version, as on a host)")
    p.add_argument("--config-reader", action="store_true",
                   help="measure only what reading the config costs a sendmail run, scanner "
                        "against tomllib (-n rounds of each)")
    args = p.parse_args(argv)
    python = args.python or default_python()
    print(f"deliverd's sendmail runs {python}", flush=True)
    if args.config_reader:
        print(table(config_reader(python, args.invocations), (
            ("reader", "config reader"), ("wall_p50_ms", "process p50 ms"),
            ("read_p50_ms", "import + read p50 ms"), ("modules", "modules loaded"))))
        return 0
    rows: list[dict[str, Any]] = []
    failed = False
    reasons: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="deliverd-sendmail-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        for kind in [m for m in args.mtas.split(",") if m]:
            try:
                rows += run_mta(kind, base, args.invocations, python)
            except LabError as exc:
                failed = failed or kind not in NOT_WIRED
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "?"
                rows.append({"mta": kind, "parallel": "not measured"})
                reasons[kind] = reason
    print(table(rows, (("mta", "sendmail of"), ("parallel", "parallel"), ("p50_ms", "p50 ms"),
                       ("p99_ms", "p99 ms"), ("calls_per_s", "calls/s"),
                       ("all_delivered_s", "all delivered s"))))
    for kind, reason in reasons.items():
        print(f"{kind} not measured: {reason}")
    return 1 if failed else 0
