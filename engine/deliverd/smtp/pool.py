"""Connection reuse and concurrency limits for outbound SMTP sessions.

Modelled on httpcore's pool: a session has an explicit state, the pool hands out idle sessions
for a key and takes them back after a clean transaction. The key holds everything that makes a
session's identity (address, port, route, the AUTH user and the verified TLS name), so mail
authenticated as one user never leaves over a session authenticated as another.

Limits count sessions in use: ``max_sessions`` in total and ``per_destination`` per (address,
port). Idle sessions are bounded by the same numbers and expire after ``idle_timeout``. The pool
never does I/O: it returns the sessions to close, and the transport QUITs them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

from deliverd.config.model import LimitsConfig
from deliverd.core.outcomes import Route
from deliverd.smtp.session import SmtpSession

Destination = tuple[str, int]


@dataclass(frozen=True)
class SessionKey:
    address: str
    port: int
    route: Route
    username: str | None = None
    tls_name: str | None = None  # the name the certificate was verified for, if it was
    route_name: str | None = None  # a route's sessions follow its own TLS and login settings

    @property
    def destination(self) -> Destination:
        return (self.address, self.port)


class SessionState(IntEnum):
    ACTIVE = 1
    IDLE = 2
    CLOSED = 3


@dataclass
class PooledSession:
    key: SessionKey
    session: SmtpSession
    generation: int
    state: SessionState = SessionState.ACTIVE
    transactions: int = 0
    idle_since: float = 0.0

    def is_idle(self) -> bool:
        return self.state is SessionState.IDLE

    def is_reusable(self, cap: int) -> bool:
        """Alive, and under the ``messages_per_session`` cap (0 = no cap)."""
        return self.session.alive and (cap == 0 or self.transactions < cap)


class FailureCache:
    """Destinations that just failed to connect, skipped until their entry expires."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[Destination, float] = {}

    def record(self, destination: Destination, ttl: float) -> None:
        if ttl > 0:
            self._until[destination] = self._clock() + ttl

    def is_cached(self, destination: Destination) -> bool:
        until = self._until.get(destination)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[destination]
            return False
        return True


@dataclass
class _Gate:
    semaphore: asyncio.Semaphore
    users: int = 0


@dataclass
class SessionPool:
    limits: LimitsConfig
    idle_timeout: float = 30.0
    clock: Callable[[], float] = time.monotonic
    generation: int = 0
    _idle: list[PooledSession] = field(default_factory=list)
    _gates: dict[Destination, _Gate] = field(default_factory=dict)
    _global: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._global = asyncio.Semaphore(max(1, self.limits.max_sessions))

    @asynccontextmanager
    async def slot(self, destination: Destination) -> AsyncIterator[None]:
        """Hold one session slot for ``destination``.

        The per-destination gate is taken first, so a task waiting for a busy destination never
        sits on a global slot that mail for other destinations could use.
        """
        gate = self._gates.get(destination)
        if gate is None:
            gate = _Gate(asyncio.Semaphore(max(1, self.limits.per_destination)))
            self._gates[destination] = gate
        gate.users += 1
        global_slot = self._global  # a reload swaps it; release the one we took
        try:
            async with gate.semaphore, global_slot:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0 and self._gates.get(destination) is gate:
                del self._gates[destination]

    def take_idle(self, key: SessionKey) -> tuple[PooledSession | None, list[PooledSession]]:
        """An idle live session for ``key`` (newest first), and dead ones found on the way."""
        dead: list[PooledSession] = []
        found: PooledSession | None = None
        for pooled in reversed(self._idle):
            if pooled.key != key:
                continue
            if pooled.session.alive and pooled.generation == self.generation:
                found = pooled
                break
            dead.append(pooled)
        for pooled in [*dead, *([found] if found else [])]:
            self._idle.remove(pooled)
        for pooled in dead:
            pooled.state = SessionState.CLOSED
        if found is not None:
            found.state = SessionState.ACTIVE
        return found, dead

    def put_idle(self, pooled: PooledSession) -> list[PooledSession]:
        """Keep ``pooled`` for reuse; returns the sessions to close (it, or older ones)."""
        if pooled.generation != self.generation or not pooled.is_reusable(
            self.limits.messages_per_session
        ):
            pooled.state = SessionState.CLOSED
            return [pooled]
        pooled.state = SessionState.IDLE
        pooled.idle_since = self.clock()
        self._idle.append(pooled)
        evicted: list[PooledSession] = []
        same = [p for p in self._idle if p.key.destination == pooled.key.destination]
        while len(same) > max(1, self.limits.per_destination):
            evicted.append(same.pop(0))
        excess = len(self._idle) - len(evicted) - max(1, self.limits.max_sessions)
        evicted += [p for p in self._idle if p not in evicted][: max(0, excess)]
        for old in evicted:
            self._idle.remove(old)
            old.state = SessionState.CLOSED
        return evicted

    def expired(self) -> list[PooledSession]:
        """Remove and return idle sessions past ``idle_timeout`` (or already dead)."""
        now = self.clock()
        gone = [
            p for p in self._idle
            if now - p.idle_since >= self.idle_timeout or not p.session.alive
        ]
        for pooled in gone:
            self._idle.remove(pooled)
            pooled.state = SessionState.CLOSED
        return gone

    def next_expiry(self) -> float | None:
        """Seconds until the oldest idle session expires; None when nothing is idle."""
        if not self._idle:
            return None
        oldest = min(p.idle_since for p in self._idle)
        return max(0.0, oldest + self.idle_timeout - self.clock())

    def drain(self) -> list[PooledSession]:
        """Remove and return every idle session."""
        idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.state = SessionState.CLOSED
        return idle

    def reconfigure(self, limits: LimitsConfig) -> list[PooledSession]:
        """New limits for new slots; sessions made under the old config are not reused."""
        self.limits = limits
        self.generation += 1
        self._global = asyncio.Semaphore(max(1, limits.max_sessions))
        self._gates = {}
        return self.drain()

    @property
    def idle_count(self) -> int:
        return len(self._idle)
