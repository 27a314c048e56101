"""CPU seconds and resident memory of an MTA's process tree, read from /proc.

CPU: ``utime + stime`` of every live process of the tree plus ``cutime + cstime`` of its
root, which holds the CPU of children the root has already reaped (Postfix's master reaps
smtpd, cleanup, smtp... when they exit), so nothing that ran is missed. A run's CPU is the
difference of two snapshots. Memory: the sum of ``Pss`` over the tree, sampled by a thread;
for a single process its ``VmHWM`` (the kernel's own peak) is exact and taken as well.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")

Tree = Callable[[], list[int]]


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int], root: int) -> float:
    """CPU used so far by ``pids`` (live) plus the reaped children of ``root``."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` value of /proc/PID/status (``VmRSS``, ``VmHWM``); 0 when gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_kb(pids: list[int]) -> int:
    """Summed proportional set size (Pss): a shared page counts once over the tree, so
    Postfix's many processes sharing libc are not counted many times over."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent_of[int(entry.name)] = int(stat_fields(int(entry.name))[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parent_of.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


class RssSampler(threading.Thread):
    """Samples the tree's summed RSS every ``interval`` seconds; ``peak_kb`` is the maximum."""

    def __init__(self, tree: Tree, interval: float = 0.2) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.tree = tree
        self.interval = interval
        self.peak_kb = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb(self.tree()))
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak_kb = max(self.peak_kb, rss_kb(self.tree()))
        return self.peak_kb
