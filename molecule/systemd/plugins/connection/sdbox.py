# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible connection into a running sdbox container (``deliverd_lab.sdbox.exec_argv``: nsenter
into every namespace of the container's PID 1), run from the host as root."""

from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

try:
    from deliverd_lab.common import LabError
    from deliverd_lab.sdbox import exec_argv
except ImportError as exc:  # the checkout's engine/ is not on this Python's path
    raise AnsibleError("the sdbox connection needs the project's deliverd_lab package") from exc

DOCUMENTATION = """
name: sdbox
short_description: Run tasks inside an sdbox systemd container
description:
  - Enters a container started by C(python -m deliverd_lab.sdbox start ROOT NAME) by
    nsentering into all the namespaces of the container's PID 1. Needs root on the host and
    the project's deliverd_lab package importable by Ansible; no network and no sshd.
options:
  remote_addr:
    description: The container's name (as given to C(deliverd_lab.sdbox start)).
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
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
        try:
            return exec_argv(name, [*ENV, "/bin/sh", "-c", command])
        except LabError as exc:
            raise AnsibleConnectionFailure(str(exc)) from exc

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        try:
            proc = subprocess.run(self._argv(cmd), input=in_data or b"", capture_output=True,
                                  check=False)
        except OSError as exc:
            raise AnsibleConnectionFailure(f"cannot run nsenter: {exc}") from exc
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
