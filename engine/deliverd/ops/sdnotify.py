"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per state change.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket (a path, or
an abstract name written with a leading ``@``), and reads newline-separated ``KEY=VALUE``
assignments from it: ``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``. Without the variable (not under systemd) every call does nothing.
A failed send is reported to the caller, never raised: the daemon must not die of its supervisor.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address if address.startswith(("/", "\0")) else ""
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``ready=1`` becomes ``READY=1``); True when sent."""
        if not self.address:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode("utf-8"), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) tie the reload to this message.
        return self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.notify(stopping=1)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when none is wanted."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None  # meant for another process (e.g. our parent before a fork)
    return usec / 2_000_000
