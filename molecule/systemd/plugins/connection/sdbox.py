# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible connection into a running sdbox container (``../shared/lab/sdbox.sh exec``: nsenter
into every namespace of the container's PID 1), run from the host as root."""

from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: sdbox
short_description: Run tasks inside an sdbox systemd container
description:
  - Enters a container started by sdbox.sh through C(sdbox.sh exec NAME), which nsenters into
    all the namespaces of the container's PID 1. Needs root on the host; no network, no sshd
    and no Python on the host side beyond Ansible's own.
options:
  remote_addr:
    description: The container's name (as given to C(sdbox.sh start)).
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
  sdbox_script:
    description: Path of sdbox.sh.
    required: true
    env:
      - name: SDBOX_SCRIPT
    vars:
      - name: sdbox_script
"""

# A clean environment inside: nsenter would pass on the host's (the controller's venv, etc.).
ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]


class Connection(ConnectionBase):
    transport = "sdbox"
    has_pipelining = True
    default_user = "root"

    def _connect(self) -> Connection:
        self._connected = True
        return self

    def _argv(self, command: str) -> list[str]:
        name = self.get_option("remote_addr")
        return [self.get_option("sdbox_script"), "exec", name, *ENV, "/bin/sh", "-c", command]

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        try:
            proc = subprocess.run(self._argv(cmd), input=in_data or b"", capture_output=True,
                                  check=False)
        except OSError as exc:
            raise AnsibleConnectionFailure(f"cannot run sdbox.sh: {exc}") from exc
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as source:
            proc = subprocess.run(self._argv(f"cat > {shlex.quote(out_path)}"), stdin=source,
                                  capture_output=True, check=False)
        if proc.returncode != 0:
            error = proc.stderr.decode(errors="replace")
            raise AnsibleError(f"copying {in_path} to {out_path} failed: {error}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as target:
            proc = subprocess.run(self._argv(f"cat {shlex.quote(in_path)}"), stdout=target,
                                  stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            error = proc.stderr.decode(errors="replace")
            raise AnsibleError(f"fetching {in_path} to {out_path} failed: {error}")

    def close(self) -> None:
        self._connected = False
