"""Haraka 3 (Node.js, from the npm registry into a cache directory) relaying to a smart host.

The configuration a user writes for "forward everything from loopback to one host": the
``relay`` plugin with an ACL for 127.0.0.0/8 and ``queue/smtp_forward`` pointed at the smart
host (``enable_outbound=true`` so relayed mail takes the same path). Not a store-and-forward
queue: ``smtp_forward`` opens (or reuses from its pool) a connection to the smart host during
the client's DATA and answers the client with the smart host's reply, so nothing is written to
disk and nothing fsynced; a message is "queued" once the next hop has it.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from deliverd_lab.common import LabError
from deliverd_lab.served import ForegroundServer

VERSION = "3.3.4"
_QUEUED = re.compile(r"\[core\] queue code=OK")


def install(cache: Path, version: str = VERSION, timeout: float = 600.0) -> Path:
    """``npm install Haraka@version`` into ``cache/haraka`` (once); return its ``haraka``."""
    prefix = cache / "haraka"
    binary = prefix / "node_modules" / ".bin" / "haraka"
    if not binary.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--prefix", str(prefix), f"Haraka@{version}"],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not binary.exists():
            raise LabError(f"npm install Haraka failed: {done.stderr.strip()[-2000:]}")
    return binary


class HarakaForward(ForegroundServer):
    name = "haraka"

    def __init__(self, workdir: Path, cache: Path, *, listen: str = "127.0.0.1", port: int,
                 smarthost: str, smarthost_port: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "haraka.log", listen, port)
        self.binary = install(cache)
        # ``haraka -i`` writes the default install (connection.ini...), as a user starts.
        self.home = workdir / "home"
        if not self.home.exists():
            subprocess.run([str(self.binary), "-i", str(self.home)], capture_output=True,
                           check=True, timeout=60)
        self.config_dir = self.home / "config"
        for name, text in self.config(smarthost, smarthost_port).items():
            (self.config_dir / name).write_text(text)

    def config(self, smarthost: str, smarthost_port: int) -> dict[str, str]:
        return {
            "smtp.ini": f"[main]\nlisten={self.listen}:{self.port}\n",
            "plugins": "relay\nqueue/smtp_forward\n",
            "relay.ini": "[relay]\nacl=true\n",
            "relay_acl_allow": "127.0.0.0/8\n",
            "smtp_forward.ini": (f"host={smarthost}\nport={smarthost_port}\n"
                                 "enable_tls=false\nenable_outbound=true\n"),
            "log.ini": "[main]\nlevel=notice\n",
            "me": "haraka.bench\n",
        }

    def start(self, timeout: float = 60.0) -> None:
        self._start([str(self.binary), "-c", str(self.home)], timeout, cwd=self.home)
        # Its cluster master listens before the worker is ready; the worker logs when it is.
        deadline = time.monotonic() + timeout
        while "worker 1 listening" not in self.log_text():
            if time.monotonic() > deadline or self.pid is None:
                self.stop()
                raise LabError(f"haraka's worker never listened: {self.log_text()[-2000:]}")
            time.sleep(0.1)

    def queue_empty(self) -> bool:
        return True  # no queue: the 250 came from the smart host

    def delays(self) -> list[float]:
        return []  # nothing is queued, so there is no queue delay to report
