"""Boot or stop this scenario's containers: ``boxes.py start|stop NAME...``.

tests/fixtures/sdbox.py does the work, as for tests/ansible/test_systemd_role.py: the root built once
and cached under .cache/, a volatile overlay per container (every boot is a fresh host), and
--private-network (only the container's own loopback: no package index is reachable).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.fixtures.sdbox import start, stop


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print("usage: boxes.py start|stop NAME...", file=sys.stderr)
        return 2
    action, names = argv[0], argv[1:]
    for name in names:
        if action == "start":
            start(name)
        else:
            stop(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
