"""The inbound session caps: ``limits.max_inbound_sessions`` and ``max_inbound_per_client``."""

from __future__ import annotations

from collections.abc import Callable

SESSIONS_REFUSED = "max_inbound_sessions"
CLIENT_REFUSED = "max_inbound_per_client"
REPLY_TOO_MANY = b"421 4.3.2 Too many connections, try again later\r\n"


class InboundGate:
    """Counts the inbound SMTP sessions of every listener, in all and per client address.

    ``admit`` is asked when a connection arrives, before any byte is read from it; a refused
    connection is not counted. One gate lives as long as the daemon, so a reload that rebinds
    the listeners keeps counting the sessions still open on the old ones.
    """

    def __init__(self, on_refused: Callable[[str], None] | None = None) -> None:
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.on_refused = on_refused

    def admit(self, client: str, max_sessions: int, max_per_client: int) -> str | None:
        """Count a new session from ``client``; or the reason it is refused (nothing counted)."""
        if self.total >= max_sessions:
            return SESSIONS_REFUSED
        if self.per_client.get(client, 0) >= max_per_client:
            return CLIENT_REFUSED
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.per_client.get(client, 0) - 1
        if left > 0:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)
