"""Counters of what the engine did, written to ``<queue.path>/metrics.json`` for monitoring.

Counts since the daemon started: attempts by status, DSNs sent, and the smart host failures an
operator must act on (AUTH, TLS, POP-before-SMTP): those defer mail instead of bouncing it, so
a credential typo shows up here and in the log, not as bounces.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

METRICS_NAME = "metrics.json"


class Metrics:
    def __init__(self, clock: float | None = None) -> None:
        self.started = time.time() if clock is None else clock
        self._counts: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def get(self, name: str) -> int:
        return self._counts[name]

    def snapshot(self) -> dict[str, object]:
        return {"started": self.started, "written": time.time(),
                "counters": dict(sorted(self._counts.items()))}

    def write(self, directory: str | Path) -> Path:
        """Atomically replace ``directory/metrics.json`` (readers never see half a file)."""
        path = Path(directory) / METRICS_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path
