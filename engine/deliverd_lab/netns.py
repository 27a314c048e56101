"""A multi-host lab on one machine: network namespaces on a bridge, each reached by real SSH.

Layout (all addresses from the documentation range 198.51.100.0/24; no default route, no NAT,
so lab traffic never leaves the machine)::

    root namespace   bridge dlvbr0 198.51.100.1/24 (the Ansible controller's side)
    dlv-h1..dlv-hN   one engine host each: veth eth0 198.51.100.11.., lo up, sshd on :22
    dlv-svc          the lab's servers (DNS, smart hosts, POP3, sinks) on its own addresses

Everything the lab writes lives under one lab directory: per-host sshd config, host key, pid
file and log (``ssh/<host>/``), the Ansible key pair (``ssh/id_ed25519``), a known_hosts file
naming every host key, and ``inventory.yml`` (group ``deliverd``) for ansible-playbook.

``create`` is idempotent (it completes a half-built lab and leaves a built one alone);
``destroy`` kills every process left in the lab's namespaces, deletes them and the bridge, and
is safe to run twice. Run as root: ``python -m deliverd_lab.netns create --lab-dir DIR``.

Deciding what to do is pure (``plan``, ``LabLayout`` and the config/inventory text builders);
the ``ip``/``sshd`` calls are at the bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deliverd_lab.common import LabError, pid_alive, read_pid, terminate, wait_for_port

BRIDGE = "dlvbr0"
NETWORK = ipaddress.IPv4Network("198.51.100.0/24")
BRIDGE_ADDRESS = "198.51.100.1"
FIRST_HOST_ADDRESS = 11
SERVICE_NAMESPACE = "dlv-svc"
SSH_PORT = 22
SSH_USER = "root"
SSHD = "/usr/sbin/sshd"
# sshd refuses to start without its privilege separation directory.
SSHD_PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class LabHost:
    """One engine host: its own namespace, veth pair and sshd."""

    name: str  # inventory name, e.g. dlv-h1 (also the namespace)
    address: str
    ssh_dir: Path

    @property
    def namespace(self) -> str:
        return self.name

    @property
    def outer_link(self) -> str:
        # Interface names are limited to 15 characters; "v" + the namespace fits.
        return f"v{self.name}"[:15]

    @property
    def sshd_config(self) -> Path:
        return self.ssh_dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.ssh_dir / "ssh_host_ed25519_key"

    @property
    def pid_file(self) -> Path:
        return self.ssh_dir / "sshd.pid"

    @property
    def log_file(self) -> Path:
        return self.ssh_dir / "sshd.log"


@dataclass(frozen=True)
class LabLayout:
    """Everything about the lab that follows from its directory and size."""

    lab_dir: Path
    hosts: tuple[LabHost, ...]
    service_addresses: tuple[str, ...]

    @property
    def ssh_dir(self) -> Path:
        return self.lab_dir / "ssh"

    @property
    def private_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def public_key(self) -> Path:
        return self.ssh_dir / "id_ed25519.pub"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def inventory(self) -> Path:
        return self.lab_dir / "inventory.yml"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (*(h.namespace for h in self.hosts), SERVICE_NAMESPACE)

    @property
    def service_link(self) -> str:
        return f"v{SERVICE_NAMESPACE}"

    def ssh_common_args(self) -> str:
        """Options for every ssh to a lab host: the lab key only, and the lab's own
        known_hosts (host keys change with every new lab, so they are not checked strictly)."""
        return (f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={self.known_hosts} "
                "-o IdentitiesOnly=yes -o LogLevel=ERROR")

    def summary(self) -> dict[str, object]:
        """What create/destroy print (JSON): how to reach every host."""
        return {
            "lab_dir": str(self.lab_dir),
            "bridge": {"name": BRIDGE, "address": BRIDGE_ADDRESS},
            "service_namespace": SERVICE_NAMESPACE,
            "service_addresses": list(self.service_addresses),
            "private_key": str(self.private_key),
            "known_hosts": str(self.known_hosts),
            "inventory": str(self.inventory),
            "ssh_common_args": self.ssh_common_args(),
            "hosts": [
                {"name": h.name, "namespace": h.namespace, "address": h.address,
                 "port": SSH_PORT, "user": SSH_USER}
                for h in self.hosts
            ],
        }


def plan(lab_dir: Path, host_count: int = 3, service_addresses: Sequence[str] = ()) -> LabLayout:
    """The lab for ``host_count`` engine hosts (dlv-h1.. at 198.51.100.11..) and the service
    namespace's addresses; refuses addresses outside the lab network or used twice."""
    if not 1 <= host_count <= 50:
        raise LabError(f"host_count must be between 1 and 50, not {host_count}")
    lab_dir = lab_dir.resolve()
    hosts = tuple(
        LabHost(
            name=f"dlv-h{i}",
            address=str(NETWORK.network_address + FIRST_HOST_ADDRESS + i - 1),
            ssh_dir=lab_dir / "ssh" / f"dlv-h{i}",
        )
        for i in range(1, host_count + 1)
    )
    taken = {BRIDGE_ADDRESS, *(h.address for h in hosts)}
    for address in service_addresses:
        if ipaddress.IPv4Address(address) not in NETWORK:
            raise LabError(f"service address {address} is outside the lab network {NETWORK}")
        if address in taken:
            raise LabError(f"service address {address} is the bridge's or a host's, or repeated")
        taken.add(address)
    return LabLayout(lab_dir, hosts, tuple(service_addresses))


def sshd_config_text(host: LabHost, authorized_keys: Path) -> str:
    return (
        f"ListenAddress {host.address}:{SSH_PORT}\n"
        f"HostKey {host.host_key}\n"
        f"PidFile {host.pid_file}\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        # The lab directory may sit under a sticky world-writable /tmp, which StrictModes
        # refuses; the key files themselves are written root-owned with tight modes.
        "StrictModes no\n"
        # Ansible transfers files with SFTP; the internal server needs no binary path.
        "Subsystem sftp internal-sftp\n"
        "PrintMotd no\n"
        "UseDNS no\n"
        "MaxStartups 50\n"
        "MaxSessions 50\n"
    )


def known_hosts_text(layout: LabLayout) -> str:
    """One line per host from the host keys the lab generated: nothing is learnt on first use."""
    lines = []
    for host in layout.hosts:
        public = Path(f"{host.host_key}.pub")
        if public.exists():
            key_type, key = public.read_text().split()[:2]
            lines.append(f"{host.address} {key_type} {key}\n")
    return "".join(lines)


def inventory_text(layout: LabLayout) -> str:
    """A YAML inventory: group ``deliverd`` with every host reached by SSH with the lab key.
    Written as JSON, which is YAML, so no YAML library is needed."""
    hosts = {
        h.name: {
            "ansible_connection": "ssh",
            "ansible_host": h.address,
            "ansible_port": SSH_PORT,
            "ansible_user": SSH_USER,
            "ansible_ssh_private_key_file": str(layout.private_key),
            "ansible_ssh_common_args": layout.ssh_common_args(),
        }
        for h in layout.hosts
    }
    return json.dumps({"deliverd": {"hosts": hosts}}, indent=2) + "\n"


# -- I/O: ip, ssh-keygen, sshd ----------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=60)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def _in_ns(namespace: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _ip("netns", "exec", namespace, *argv, check=check)


def netns_available() -> bool:
    """Whether this process may create network namespaces (root with ``ip netns``)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return _ip("netns", "list", check=False).returncode == 0


def existing_namespaces() -> set[str]:
    listing = _ip("netns", "list").stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def _link_exists(name: str, namespace: str | None = None) -> bool:
    args = ("link", "show", name)
    if namespace is None:
        return _ip(*args, check=False).returncode == 0
    return _in_ns(namespace, "ip", *args, check=False).returncode == 0


def _ensure_bridge() -> None:
    if not _link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
    address = f"{BRIDGE_ADDRESS}/{NETWORK.prefixlen}"
    if address not in _ip("-4", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", address, "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _ensure_namespace(namespace: str, outer: str, addresses: Sequence[str]) -> None:
    """Namespace with lo up and a veth (eth0 inside, ``outer`` on the bridge) holding
    ``addresses``. No default route: only the lab network is reachable from inside."""
    if namespace not in existing_namespaces():
        _ip("netns", "add", namespace)
    _in_ns(namespace, "ip", "link", "set", "lo", "up")
    if not _link_exists("eth0", namespace):
        if _link_exists(outer):  # half of a pair left by an interrupted create
            _ip("link", "del", outer)
        _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    _ip("link", "set", outer, "master", BRIDGE)
    _ip("link", "set", outer, "up")
    present = _in_ns(namespace, "ip", "-4", "addr", "show", "dev", "eth0").stdout
    for address in addresses:
        if f"inet {address}/" not in present:
            _in_ns(namespace, "ip", "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
    _in_ns(namespace, "ip", "link", "set", "eth0", "up")


def _ensure_key(private: Path, comment: str) -> None:
    if private.exists() and Path(f"{private}.pub").exists():
        return
    private.unlink(missing_ok=True)
    Path(f"{private}.pub").unlink(missing_ok=True)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private))


def _sshd_running(host: LabHost) -> bool:
    pid = read_pid(host.pid_file)
    return pid is not None and pid_alive(pid)


def _ensure_sshd(layout: LabLayout, host: LabHost) -> None:
    host.ssh_dir.mkdir(parents=True, exist_ok=True)
    host.ssh_dir.chmod(0o755)
    _ensure_key(host.host_key, f"{host.name} host key")
    text = sshd_config_text(host, layout.authorized_keys)
    if not host.sshd_config.exists() or host.sshd_config.read_text() != text:
        host.sshd_config.write_text(text)
    if _sshd_running(host):
        return
    _run(SSHD, "-t", "-f", str(host.sshd_config))
    _in_ns(host.namespace, SSHD, "-f", str(host.sshd_config), "-E", str(host.log_file))


def _wait_sshd(host: LabHost, timeout: float = 15.0) -> None:
    # The controller reaches the host over the bridge, exactly as Ansible will.
    wait_for_port(host.address, SSH_PORT, timeout, f"sshd of {host.name}")


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
    path.chmod(mode)


def create(layout: LabLayout) -> None:
    """Build (or complete) the lab: bridge, namespaces, keys, one sshd per host, inventory."""
    if not netns_available():
        raise LabError("the namespace lab needs root and a working `ip netns`")
    layout.lab_dir.mkdir(parents=True, exist_ok=True)
    layout.lab_dir.chmod(0o755)  # lab servers running as other users look inside
    layout.ssh_dir.mkdir(exist_ok=True)
    layout.ssh_dir.chmod(0o755)
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    _ensure_bridge()
    for host in layout.hosts:
        _ensure_namespace(host.namespace, host.outer_link, (host.address,))
    _ensure_namespace(SERVICE_NAMESPACE, layout.service_link, layout.service_addresses)
    _ensure_key(layout.private_key, "deliverd lab ansible key")
    _write_if_changed(layout.authorized_keys, layout.public_key.read_text(), 0o644)
    for host in layout.hosts:
        _ensure_sshd(layout, host)
    for host in layout.hosts:
        _wait_sshd(host)
    _write_if_changed(layout.known_hosts, known_hosts_text(layout), 0o644)
    _write_if_changed(layout.inventory, inventory_text(layout), 0o644)


def namespace_pids(namespace: str) -> list[int]:
    done = _ip("netns", "pids", namespace, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def destroy(layout: LabLayout) -> None:
    """Kill every process in the lab's namespaces (sshd, engines, servers), delete the
    namespaces and the bridge. Safe to run twice, and on a half-built lab."""
    if not netns_available():
        raise LabError("tearing down the namespace lab needs root and a working `ip netns`")
    for host in layout.hosts:  # sshd first: no new session may start processes meanwhile
        pid = read_pid(host.pid_file)
        if pid is not None:
            terminate(pid, 5.0)
        host.pid_file.unlink(missing_ok=True)
    present = existing_namespaces()
    for namespace in layout.namespaces:
        if namespace not in present:
            continue
        for pid in namespace_pids(namespace):
            if pid != os.getpid():
                terminate(pid, 5.0)
        _ip("netns", "del", namespace, check=False)
    for link in (*(h.outer_link for h in layout.hosts), layout.service_link, BRIDGE):
        if _link_exists(link):
            _ip("link", "del", link, check=False)


def is_built(layout: LabLayout) -> bool:
    present = existing_namespaces()
    return (all(ns in present for ns in layout.namespaces)
            and all(_sshd_running(h) for h in layout.hosts))


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deliverd_lab.netns",
        description="build or tear down the deliverd network namespace lab (root only)",
    )
    parser.add_argument("action", choices=("create", "destroy", "status"))
    parser.add_argument("--lab-dir", type=Path, required=True)
    parser.add_argument("--hosts", type=int, default=3, help="engine hosts (default 3)")
    parser.add_argument("--service-address", action="append", default=[], metavar="IP",
                        help="an address of the dlv-svc namespace (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        layout = plan(args.lab_dir, args.hosts, args.service_address)
        if args.action == "create":
            create(layout)
        elif args.action == "destroy":
            destroy(layout)
        summary = layout.summary()
        with contextlib.suppress(LabError):
            summary["built"] = is_built(layout)
    except LabError as exc:
        print(f"deliverd lab: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
