"""The multi-host molecule lab (molecule/lab) end to end, plus the namespace helpers' pure parts.

``molecule test -s lab`` builds three engine hosts in network namespaces reached by real SSH,
real DNS/Postfix/Dovecot/aiosmtpd servers in a service namespace, deploys per-host specs,
checks idempotence and check mode, verifies each host's route with real mail, rolls a smart
host change out (a rejected one first), rotates every host's DKIM key to a new selector while
mail flows (playbooks/rotate-dkim.yml: its preflight refusing a missing and a mismatched
record first; the sinks verify every message's signature against the lab's DNS), and tears
everything down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deliverd_lab.common import LabError
from deliverd_lab.netns import (
    BRIDGE_ADDRESS,
    inventory_text,
    netns_available,
    plan,
    sshd_config_text,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"


def test_plan_numbers_hosts_from_eleven_on_the_lab_network(tmp_path: Path) -> None:
    layout = plan(tmp_path, 3, ["198.51.100.2"])
    assert [(h.name, h.address) for h in layout.hosts] == [
        ("dlv-h1", "198.51.100.11"), ("dlv-h2", "198.51.100.12"), ("dlv-h3", "198.51.100.13"),
    ]
    assert layout.namespaces == ("dlv-h1", "dlv-h2", "dlv-h3", "dlv-svc")
    assert all(len(h.outer_link) <= 15 for h in layout.hosts)


@pytest.mark.parametrize("address", ["203.0.113.5", BRIDGE_ADDRESS, "198.51.100.12"])
def test_plan_refuses_service_addresses_off_network_or_taken(
    tmp_path: Path, address: str
) -> None:
    with pytest.raises(LabError):
        plan(tmp_path, 3, [address])


def test_sshd_config_keeps_each_host_to_its_own_address_key_and_pid(tmp_path: Path) -> None:
    layout = plan(tmp_path, 2)
    first, second = (sshd_config_text(h, layout.authorized_keys) for h in layout.hosts)
    assert "ListenAddress 198.51.100.11:22" in first
    assert "ListenAddress 198.51.100.12:22" in second
    assert str(layout.hosts[0].pid_file) in first and str(layout.hosts[0].pid_file) not in second
    assert "PasswordAuthentication no" in first


def test_inventory_reaches_every_host_by_ssh_with_the_lab_key(tmp_path: Path) -> None:
    layout = plan(tmp_path, 3)
    hosts = json.loads(inventory_text(layout))["deliverd"]["hosts"]
    assert sorted(hosts) == ["dlv-h1", "dlv-h2", "dlv-h3"]
    for host in hosts.values():
        assert host["ansible_connection"] == "ssh"
        assert host["ansible_ssh_private_key_file"] == str(layout.private_key)
        assert f"UserKnownHostsFile={layout.known_hosts}" in host["ansible_ssh_common_args"]


def _lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the namespace lab needs root (ip netns, sshd, Postfix)"
    if not netns_available():
        return "`ip netns` is not available here (no iproute2 or no permission)"
    for binary in ("sshd", "postfix", "dovecot", "dnsmasq", "swaks"):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            return f"{binary} is not installed"
    if not (VENV_BIN / "molecule").exists():
        return "molecule is not installed in the repo's .venv"
    return None


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_molecule_lab_deploys_verifies_routes_changes_smarthost_and_rotates_dkim() -> None:
    reason = _lab_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    env["PY_COLORS"] = "0"
    done = subprocess.run(
        [str(VENV_BIN / "molecule"), "test", "-s", "lab"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=1400, check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-12000:]
