"""`make demo` (or another target) on a fresh Debian 12, as a new user would run it.

A minimal bookworm root with only ``make`` added (debootstrap from the mirror the machine's apt
uses), a ``git clone`` of the checkout in ``/src``, then the target run there by systemd-nspawn
without booting: the command is PID 1, as in most containers, systemd is not running, and the
container shares the host's network so apt and pip reach their registries. Nothing else of the
host is shared but one thing: the CA bundle this machine's TLS clients use (``SSL_CERT_FILE``),
copied to a path Debian's ``ca-certificates`` never regenerates and named in ``/etc/pip.conf``,
for networks whose traffic to registries is re-signed by a local CA.

``python -m deliverd_lab.freshdebian --root DIR [--target demo] [--keep] CHECKOUT`` (root only;
the root is built anew and removed afterwards unless ``--keep``). Prints the target's output and
how long each step took; exits with the target's status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deliverd_lab import sdbox
from deliverd_lab.common import LabError

IN_SOURCE = "/src"
HOST_CA = "usr/local/share/deliverd-lab/host-ca.crt"  # inside the root


def host_ca_bundle() -> Path | None:
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def prepare(root: Path, checkout: Path, ca_bundle: Path | None) -> list[str]:
    """Build the root, clone the checkout into it; the environment the target runs with."""
    if root.exists() and any(root.iterdir()):
        raise LabError(f"{root} exists and is not empty: a fresh root needs a new directory")
    sdbox.build(root, packages=("make",))
    done = subprocess.run(["git", "clone", "--quiet", str(checkout), str(root / "src")],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"git clone of {checkout} failed: {done.stderr}")
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
           "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
    if ca_bundle is not None:
        target = root / HOST_CA
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_bundle, target)
        (root / "etc" / "pip.conf").write_text(f"[global]\ncert = /{HOST_CA}\n")
        env += [f"SSL_CERT_FILE=/{HOST_CA}", f"PIP_CERT=/{HOST_CA}",
                f"REQUESTS_CA_BUNDLE=/{HOST_CA}"]
    return env


def run_target(root: Path, target: str, env: Sequence[str]) -> int:
    done = sdbox.run_unbooted(root, ["env", "-i", *env, "make", target],
                              ["--capability=all", f"--chdir={IN_SOURCE}"], capture=False)
    return done.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deliverd_lab.freshdebian",
                                     description="run a make target in a fresh Debian 12")
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--root", type=Path, required=True, help="a new directory")
    parser.add_argument("--target", default="demo")
    parser.add_argument("--keep", action="store_true", help="keep the root afterwards")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        env = prepare(args.root, args.checkout.resolve(), host_ca_bundle())
        built = time.monotonic()
        print(f"freshdebian: root built and checkout cloned in {built - started:.0f}s",
              flush=True)
        status = run_target(args.root, args.target, env)
        print(f"freshdebian: make {args.target} exited {status} after "
              f"{time.monotonic() - built:.0f}s ({time.monotonic() - started:.0f}s in all)",
              flush=True)
    except LabError as exc:
        print(f"freshdebian: {exc}", file=sys.stderr)
        status = 1
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
