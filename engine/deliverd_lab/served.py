"""A foreground server process started once and stopped with SIGTERM: shared by the peers."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from deliverd_lab.common import LabError, children_of, reap, terminate, wait_for_port


class ForegroundServer:
    """Runs ``argv`` with its output in ``log_path``; ``pid`` is the server's own pid."""

    name = "server"

    def __init__(self, log_path: Path, listen: str, port: int) -> None:
        self.log_path = log_path
        self.listen = listen
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, argv: Sequence[str], timeout: float, cwd: Path | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=cwd)
        try:
            wait_for_port(self.listen, self.port, timeout, self.name)
        except Exception as exc:
            self.stop()
            raise LabError(f"{self.name} did not start: {self.log_text()[-2000:]}") from exc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and any child still running; safe to call twice."""
        if self.proc is None:
            return
        children = children_of(self.proc.pid)
        if self.proc.poll() is None:
            terminate(self.proc.pid, timeout)
        self.proc.wait(5)
        reap(children)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
