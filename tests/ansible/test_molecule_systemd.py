"""The molecule scenario ``systemd`` (molecule/systemd) end to end: two systemd containers booted
from the cached root with no network but their loopback, the role run into them from this
machine (the scenario's sdbox connection plugin), a second run that changes nothing, then mail
through each host's engine to a smart host on its loopback, and the containers powered off."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from deliverd_lab import sdbox
from tests.fixtures import paths

REPO = paths.REPO
VENV_BIN = REPO / ".venv" / "bin"

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "booting systemd containers (systemd-nspawn) needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (Debian package systemd-container)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (needed once, to build the container root)"
    if not (VENV_BIN / "molecule").exists():
        return "molecule is not installed in the repo's .venv"
    return None


def test_molecule_systemd_scenario_converges_offline_hosts_idempotently_and_mail_flows() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    suffix = f"t{os.getpid()}"
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0", "DELIVERD_SDBOX_SUFFIX": suffix}
    try:
        done = subprocess.run([str(VENV_BIN / "molecule"), "test", "-s", "systemd"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=1400,
                              check=False)
    finally:
        # molecule's destroy ran unless molecule itself died; stopping twice is harmless.
        for host in ("dlv-sd1", "dlv-sd2"):
            sdbox.stop(f"{host}-{suffix}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-12000:]
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert f"[systemd > {step}] Executed: Successful" in output, step
