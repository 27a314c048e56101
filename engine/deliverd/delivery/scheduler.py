"""The delivery scheduler: takes due messages from the queue, delivers, records, notifies.

Per message: one planner attempt per destination (recipient domain; the whole message for the
smart host), run concurrently; then, in this order, so a crash at any point repeats work rather
than losing it: queue any DSN, record every recipient's new state, remove the message when all
its recipients are final. DSNs are asked of the notice service (``deliverd.reports.notices``),
which writes them and hands them to the one way into the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import replace
from datetime import UTC, datetime

from deliverd.config.model import Config, OnExpiry
from deliverd.core.dsn_params import DsnEvent, EnvelopeDsn, RcptDsn, Ret, notify_wants
from deliverd.core.outcomes import Envelope, Kind, Outcome, Route, Stage, StreamedBody
from deliverd.delivery.attempt import run_attempt
from deliverd.delivery.backoff import expired, next_attempt, retry_until
from deliverd.delivery.router import Attempt
from deliverd.delivery.routes import split_by_route
from deliverd.delivery.sts_policies import StsPolicies
from deliverd.dns.resolver import Resolver
from deliverd.ops.logline import dsn_sent, format_attempt, format_event
from deliverd.ops.metrics import Metrics
from deliverd.queue.store import (
    ChunkedBody,
    QueuedMessage,
    QueueFullError,
    QueueStore,
    RcptState,
    RecipientUpdate,
)
from deliverd.reports.dsn import DsnKind, needs_dsn
from deliverd.reports.notices import Notices
from deliverd.smtp.transport import Transport

log = logging.getLogger("deliverd")

# Smart host failures that defer mail instead of bouncing it and that only an operator fixes.
_OPERATOR_FAILURES = {Stage.AUTH: "auth", Stage.STARTTLS: "tls", Stage.POP: "pop"}

# A message whose outcome could not be written (the queue's disk is full) waits this long before
# it is tried again, instead of being re-delivered in a tight loop.
_STORAGE_COOLDOWN = 30.0

# Final states as the metrics name them (a held recipient stays held until an operator acts).
_FINAL_STATUS = {
    RcptState.DELIVERED: "sent", RcptState.BOUNCED: "bounced", RcptState.HELD: "held",
}

_POLL_CAP = 5.0  # re-read the queue at least this often (operator CLI changes, clock jumps)
# While deliveries are in flight their completions wake the loop anyway; a short fixed cap then
# replaces the next_wakeup() query, which would otherwise run once per completed message.
_BUSY_POLL = 0.25


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        store: QueueStore,
        resolver: Resolver,
        transport: Transport,
        *,
        log_format: str = "text",
        metrics: Metrics | None = None,
        sts: StsPolicies | None = None,
        notices: Notices,
    ) -> None:
        self.cfg = cfg
        self.notices = notices  # writes and queues the DSNs this asks for
        self.sts = sts
        self.metrics = metrics or Metrics()
        self.store = store
        self.resolver = resolver
        self.transport = transport
        self.log_format = log_format
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._cooling: dict[str, float] = {}  # queue id -> monotonic time it may run again
        self._capacity = cfg.limits.max_sessions * 4
        self._slots = asyncio.Semaphore(self._capacity)
        self._stopping = False
        # One generator for every attempt's MX shuffling: a fresh random.Random() per attempt
        # seeds itself from os.urandom, a syscall per message that showed up in the profile.
        self._rng = random.Random()  # noqa: S311 (load spreading, not crypto)

    def wake(self, _queue_id: str | None = None) -> None:
        """New mail or an operator's flush: look at the queue now."""
        self._wake.set()

    def update(self, cfg: Config, resolver: Resolver) -> None:
        """A reloaded config applies to every attempt that starts from now on."""
        self.cfg = cfg
        self.resolver = resolver
        if self.sts is not None:
            self.sts.update_resolver(resolver)
        self.transport.update_config(cfg)
        self.wake()

    async def run(self) -> None:
        first = True
        while not self._stopping:
            self._wake.clear()
            await self._dispatch_due()
            if first:
                # The end of start-up (bench/queue-scale times restart-to-ready by this line).
                first = False
                self._event("deliverd", f"scheduler ready: {len(self._inflight)} due at start")
            timeout = await self._sleep_for()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def stop(self, grace: float) -> None:
        """Stop taking work; let in-flight deliveries finish for ``grace`` seconds, then cancel.

        A cancelled delivery recorded nothing, so its recipients keep their queued state and
        are redone on the next start (at-least-once).
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _sleep_for(self) -> float:
        if self._inflight:
            return _BUSY_POLL
        wakeup = await self.store.next_wakeup()
        if wakeup is None:
            return _POLL_CAP
        return max(0.05, min(_POLL_CAP, wakeup - time.time()))

    async def _dispatch_due(self) -> None:
        # Ask only for as many messages as there are free slots, skipping those in flight, and
        # read their bodies in the same trip: every completion triggers a dispatch, so this
        # query runs once per delivered message and must not re-read the whole backlog.
        free = self._capacity - len(self._inflight)
        if free <= 0:
            return
        now = time.monotonic()
        self._cooling = {qid: until for qid, until in self._cooling.items() if until > now}
        due = await self.store.due_with_data(
            time.time(), limit=free, exclude=frozenset(self._inflight) | self._cooling.keys()
        )
        for message, stored in due:
            data = self._body(message, stored)
            if self._stopping:
                return
            if message.queue_id in self._inflight:
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver_guarded(message, data))
            self._inflight[message.queue_id] = task

    def _body(self, message: QueuedMessage, stored: bytes | ChunkedBody) -> bytes | StreamedBody:
        """A body stored in chunks is sent streamed, read again from the queue each time."""
        if isinstance(stored, bytes):
            return stored
        qid = message.queue_id
        return StreamedBody(message.size, stored.head, lambda: self.store.body_chunks(qid))

    async def _deliver_guarded(self, message: QueuedMessage, data: bytes | StreamedBody) -> None:
        try:
            await self._deliver(message, data)
        except asyncio.CancelledError:
            raise
        except QueueFullError as exc:
            # The attempt happened but its outcome is not on disk: it will be repeated (at least
            # once), after a pause that gives the operator time to free space.
            self._cooling[message.queue_id] = time.monotonic() + _STORAGE_COOLDOWN
            log.error("%s: cannot record the delivery attempt (%s); retrying in %.0fs",
                      message.queue_id, exc, _STORAGE_COOLDOWN)
        except Exception:
            # A bug must not kill the daemon or lose the message: it stays queued as it was.
            log.exception(
                "%s: delivery attempt failed unexpectedly; left in queue", message.queue_id
            )
        finally:
            self._inflight.pop(message.queue_id, None)
            self._slots.release()
            self._wake.set()

    async def _deliver(self, message: QueuedMessage, data: bytes | StreamedBody) -> None:
        cfg = self.cfg
        now = time.time()
        active = [
            r.address
            for r in message.recipients
            if r.state is RcptState.PENDING
            or (r.state is RcptState.DEFERRED and r.next_attempt <= now)
        ]
        if not active:
            await self.store.finish(message.queue_id)
            return
        envelope = Envelope(
            message.sender, tuple(active), data, message.smtputf8, message.eightbit,
            envelope_dsn(message),
        )
        outcomes = await self._attempt_all(cfg, envelope)
        await self._settle(message, data, outcomes)

    async def _attempt_all(self, cfg: Config, envelope: Envelope) -> list[Outcome]:
        groups = split_by_route(cfg.routes, cfg.routing.mode, envelope.sender,
                                envelope.recipients)
        attempts = []
        for (route_name, domain), rcpts in groups.items():
            route_cfg = cfg.for_route(route_name)
            attempt = Attempt(domain=domain, recipients=rcpts, routing=route_cfg.routing,
                              host=cfg.host, rng=self._rng, route_name=route_name)
            attempts.append(run_attempt(attempt, cfg=route_cfg, envelope=envelope,
                                        resolver=self.resolver, transport=self.transport,
                                        metrics=self.metrics, sts=self.sts))
        results = await asyncio.gather(*attempts)
        return [outcome for group in results for outcome in group]

    async def _settle(
        self, message: QueuedMessage, data: bytes | StreamedBody, outcomes: list[Outcome]
    ) -> None:
        cfg, now = self.cfg, time.time()
        is_expired = expired(arrival=message.arrival, now=now, retry=cfg.retry)
        attempts = {r.address: r.attempts for r in message.recipients}
        updates: list[RecipientUpdate] = []
        failed: list[Outcome] = []
        delayed: list[Outcome] = []
        routes: dict[str, Route | None] = {}
        route_names: dict[str, str | None] = {}
        expired_now: set[str] = set()
        for outcome in outcomes:
            if is_expired and outcome.kind is Kind.DEFERRED:
                expired_now.add(outcome.recipient)
                outcome = self._expire(outcome)
            routes[outcome.recipient] = outcome.route
            route_names[outcome.recipient] = outcome.route_name
            self._log(message, outcome, now)
            state, when = self._next_state(
                outcome, attempts.get(outcome.recipient, 0), now, message.arrival
            )
            if state is RcptState.BOUNCED:
                failed.append(outcome)
            elif state is RcptState.DEFERRED:
                delayed.append(outcome)
            updates.append(
                RecipientUpdate(
                    outcome.recipient, state, when, outcome.status, outcome.diagnostic,
                    outcome.relay,
                )
            )
        bounce_to_sender = needs_dsn(message.sender, message.is_dsn)
        notify = {r.address: r.notify for r in message.recipients}
        if failed and not bounce_to_sender:
            # Never bounce a bounce: hold it for the operator instead (docs/delivery.md, "Bounces").
            updates = [_held_instead(u) if u.state is RcptState.BOUNCED else u for u in updates]
            self._event(message.queue_id, "undeliverable notice held for the operator")
        elif failed:
            wanted = _wanted(failed, notify, DsnEvent.FAILURE)
            self._unreported(message.queue_id, failed, wanted)
            to = [(message.sender, wanted)]
            if is_expired and cfg.dsn.notify_postmaster:
                to.append((cfg.dsn.postmaster, failed))  # the operator's copy, whatever NOTIFY
            await self._send_dsn(message, data, DsnKind.FAILURE, to)
        if delayed and cfg.dsn.notify_delayed and not message.delay_notified and bounce_to_sender:
            wanted = _wanted(delayed, notify, DsnEvent.DELAY)
            await self._send_dsn(message, data, DsnKind.DELAY, [(message.sender, wanted)])
            await self.store.mark_delay_notified(message.queue_id)
        if bounce_to_sender:
            # NOTIFY=SUCCESS: a hop that offers DSN was told so and reports delivery itself;
            # for one that does not, our notice says the message was relayed (RFC 3461 §5.2.2).
            relayed = [o for o in _wanted(outcomes, notify, DsnEvent.SUCCESS)
                       if o.kind is Kind.DELIVERED and not o.hop_dsn]
            await self._send_dsn(message, data, DsnKind.RELAYED, [(message.sender, relayed)])
        # One write for both: the outcome and the removal of a completed message commit
        # together (no crash window between them, one group-commit job per message).
        await self.store.settle(message.queue_id, updates)
        self._count_final(message, updates, routes, route_names, expired_now, now)

    def _count_final(
        self, message: QueuedMessage, updates: list[RecipientUpdate],
        routes: dict[str, Route | None], route_names: dict[str, str | None],
        expired_now: set[str], now: float,
    ) -> None:
        """Once per recipient reaching a final status, after it is recorded."""
        for update in updates:
            status = _FINAL_STATUS.get(update.state)
            if status is None:
                continue
            if update.address in expired_now:
                status = "expired"
            route = routes.get(update.address)
            self.metrics.recipient_final(
                status, route.value if route else None, now - message.arrival,
                route_names.get(update.address),
            )

    def _expire(self, outcome: Outcome) -> Outcome:
        if outcome.kind is not Kind.DEFERRED:
            return outcome
        kind = Kind.BOUNCED if self.cfg.retry.on_expiry is OnExpiry.BOUNCE else Kind.HELD
        return replace(outcome, kind=kind, status="4.4.7",
                       diagnostic=f"{outcome.diagnostic} (message expired in queue)")

    def _next_state(
        self, outcome: Outcome, attempts: int, now: float, arrival: float
    ) -> tuple[RcptState, float]:
        if outcome.kind is Kind.DELIVERED:
            return RcptState.DELIVERED, 0.0
        if outcome.kind is Kind.BOUNCED:
            return RcptState.BOUNCED, 0.0
        if outcome.kind is Kind.HELD:
            return RcptState.HELD, 0.0
        return RcptState.DEFERRED, next_attempt(
            attempts=attempts + 1,
            now=now,
            retry=self.cfg.retry,
            temporary_reply=outcome.diagnostic.startswith("smtp;"),
            arrival=arrival,
        )

    def _unreported(self, queue_id: str, failed: list[Outcome], wanted: list[Outcome]) -> None:
        for outcome in failed:
            if outcome not in wanted:
                self._event(queue_id, f"to=<{outcome.recipient}>: no failure notice"
                                      " (the client asked for none: NOTIFY)")

    async def _send_dsn(
        self,
        message: QueuedMessage,
        data: bytes | StreamedBody,
        kind: DsnKind,
        notices: list[tuple[str, list[Outcome]]],
    ) -> None:
        """Ask for one DSN of ``kind`` per (address, outcomes) in ``notices`` that has
        outcomes (the notice service writes and queues them)."""
        notices = [(to, outcomes) for to, outcomes in notices if outcomes]
        if not notices:
            return
        until = datetime.fromtimestamp(
            retry_until(arrival=message.arrival, retry=self.cfg.retry), UTC
        )
        queued = await self.notices.dsns(kind, message, data, notices, retry_until=until)
        for dsn_id in queued:
            self.metrics.dsn_sent(kind.value)
            log.info(dsn_sent(message.queue_id, dsn_id, delay_notice=kind is DsnKind.DELAY,
                              success=kind is DsnKind.RELAYED, fmt=self.log_format))

    def _log(self, message: QueuedMessage, outcome: Outcome, now: float) -> None:
        line = format_attempt(
            queue_id=message.queue_id,
            outcome=outcome,
            delay=max(0.0, now - message.arrival),
            fmt=self.log_format,
            extra=_log_extra(outcome),
        )
        level = logging.WARNING if outcome.kind in (Kind.BOUNCED, Kind.HELD) else logging.INFO
        log.log(level, line)
        self.metrics.attempt(outcome.kind.value, outcome.status)
        if outcome.tls and outcome.kind is Kind.DELIVERED:
            self.metrics.delivered_tls(outcome.tls)  # how delivered mail was protected
        self._operator_failure(message.queue_id, outcome)

    def _operator_failure(self, queue_id: str, outcome: Outcome) -> None:
        """Say loudly, and count, what deferred mail at the smart host and needs an operator."""
        what = _OPERATOR_FAILURES.get(outcome.stage) if outcome.stage else None
        if what is None or outcome.route is not Route.SMARTHOST:
            return
        self.metrics.smarthost_failure(what)
        log.error(format_event(
            queue_id,
            f"smart host {what.upper()} failed at {outcome.relay}: mail is deferred, not bounced;"
            f" check the smart host settings ({outcome.diagnostic})",
            fmt=self.log_format,
        ))

    def _event(self, queue_id: str, text: str) -> None:
        log.info(format_event(queue_id, text, fmt=self.log_format))


def envelope_dsn(message: QueuedMessage) -> EnvelopeDsn:
    """The RFC 3461 request a queued message came with, to pass on to the next hop."""
    return EnvelopeDsn(
        ret=None if message.ret is None else Ret(message.ret),
        envid=message.envid,
        recipients={r.address: RcptDsn(r.notify, r.orcpt) for r in message.recipients
                    if r.notify is not None or r.orcpt is not None},
    )


def _wanted(
    outcomes: list[Outcome], notify: dict[str, str | None], event: DsnEvent
) -> list[Outcome]:
    """The outcomes whose recipient's NOTIFY asks for a notice of ``event``."""
    return [o for o in outcomes if notify_wants(notify.get(o.recipient), event)]


def _held_instead(update: RecipientUpdate) -> RecipientUpdate:
    return RecipientUpdate(
        update.address, RcptState.HELD, 0.0, update.status, update.diagnostic, update.relay
    )


def _log_extra(outcome: Outcome) -> dict[str, str] | None:
    """Fields after the standard ones: the route taken, and ``tls=`` for delivered mail."""
    extra: dict[str, str] = {}
    if outcome.route_name:
        extra["route_name"] = outcome.route_name
    if outcome.tls:
        extra["tls"] = outcome.tls
    return extra or None
