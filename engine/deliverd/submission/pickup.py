"""The pickup: takes what ``deliverd sendmail`` left in the maildrop into the queue.

It scans the maildrop when woken through ``public/pickup`` and every ``SCAN_EVERY`` seconds
anyway (so mail left while the daemon was down, or a lost wake-up, is never stranded). Each
file is read, its recipients resolved with the running config's local users' rules and handed,
traced with the uid that owns it, to the one way into the queue
(``deliverd.submission.cleanup.Intake``: the sender and header masqueraded, which ``sendmail``
did already but for the header of what its fast path wrote, and a file written by other means
gets too; the hop limit; DKIM), and deleted only after the queue's commit. A file that is not a
drop file, or can never be queued, is moved to ``corrupt/`` with a log line; nothing is lost
in silence. A message's queue id is derived from its file (owner, name, time), so after a
crash between the commit and the delete the next scan finds it queued and only deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deliverd.core.dsn_params import (
    DsnSyntaxError,
    check_envid,
    orcpt_of,
    parse_notify,
    parse_ret,
)
from deliverd.dkim.keys import DkimKeyError
from deliverd.queue.database import derived_queue_id
from deliverd.queue.store import QueueStore, new_queue_id
from deliverd.submission.cleanup import Arrival, Intake, local_trace
from deliverd.submission.local import UnknownLocalUser
from deliverd.submission.maildrop import (
    CORRUPT,
    DropEnvelope,
    is_temp_name,
    maildrop_dir,
    pickup_fifo,
    prepare,
)

log = logging.getLogger(__name__)

SCAN_EVERY = 10.0
BATCH = 64  # files taken at once: their enqueues share group commits
STALE_TEMP = 24 * 3600.0  # a dot-file this old was left by a sendmail that died writing it
_META_MAX = 64 * 1024


class _Corrupt(Exception):
    """The file can never be queued as it is."""


@dataclass(frozen=True)
class _Drop:
    uid: int
    mtime_ns: int
    envelope: DropEnvelope
    data: bytes


def read_drop(path: Path, max_size: int) -> _Drop:
    """One drop file: its owner, envelope and message. ``_Corrupt`` when it is not one."""
    # O_NONBLOCK: a FIFO planted in the maildrop must not hang the pickup.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise _Corrupt("not a regular file with one link")
        if info.st_size > max_size + _META_MAX:
            raise _Corrupt(f"larger than limits.max_message_size ({info.st_size} bytes)")
        line = fh.readline(_META_MAX)
        try:
            envelope = DropEnvelope.from_line(line)
        except ValueError as exc:
            raise _Corrupt(f"bad envelope line: {exc}") from None
        data = fh.read()
    if len(data) > max_size:
        raise _Corrupt(f"larger than limits.max_message_size ({len(data)} bytes)")
    return _Drop(info.st_uid, info.st_mtime_ns, envelope, data)


def pickup_trace(host: str, uid: int, queue_id: str, when: datetime) -> bytes:
    """Postfix's ``Received: by host (Postfix, from userid N)`` for locally submitted mail."""
    return local_trace(host, f"deliverd pickup, from userid {uid}", queue_id, when)


class Pickup:
    def __init__(
        self,
        queue_path: str | Path,
        store: QueueStore,
        intake: Intake,
        *,
        scan_every: float = SCAN_EVERY,
    ) -> None:
        self.queue_path = Path(queue_path)
        self.store = store  # read: was a file queued before a crash stopped its delete?
        self.intake = intake
        self.scan_every = scan_every
        self._wake = asyncio.Event()
        self._fds: list[int] = []

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        """Prepare the maildrop, listen for wake-ups, and queue what waits; the daemon awaits
        this before its scheduler runs, so a message queued before a crash is found queued
        (and its file deleted) before it can be delivered and removed from the queue."""
        try:
            await asyncio.to_thread(prepare, self.queue_path)
        except OSError as exc:
            log.error("maildrop: cannot prepare %s: %s; sendmail submissions wait until it "
                      "can be", maildrop_dir(self.queue_path), exc)
        self._listen_fifo()
        await self._scan_logged()

    async def run(self) -> None:
        """Scan on every wake-up and every ``scan_every`` seconds (after ``start``)."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.scan_every)
                self._wake.clear()
                await self._scan_logged()
        finally:
            self._close_fifo()

    async def _scan_logged(self) -> None:
        try:
            await self.scan()
        except OSError as exc:
            log.error("maildrop: scan failed: %s", exc)

    def _listen_fifo(self) -> None:
        fifo = pickup_fifo(self.queue_path)
        try:
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # Our own writer keeps the FIFO from reporting end-of-file once a client closes it.
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("maildrop: no wake-ups through %s (%s); scanning every %.0fs",
                        fifo, exc, self.scan_every)
            return
        self._fds = [reader, writer]
        asyncio.get_running_loop().add_reader(reader, self._drain, reader)

    def _drain(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(fd, 4096):
                pass
        self._wake.set()

    def _close_fifo(self) -> None:
        if self._fds:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fds[0])
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    async def scan(self) -> int:
        """Queue every waiting drop file; returns how many were queued."""
        directory = maildrop_dir(self.queue_path)
        names = await asyncio.to_thread(_waiting, directory)
        queued = 0
        for start in range(0, len(names), BATCH):
            results = await asyncio.gather(
                *(self._take(directory / name) for name in names[start:start + BATCH])
            )
            queued += sum(results)
        if names:
            await asyncio.to_thread(_fsync_dir, directory)
        return queued

    async def _take(self, path: Path) -> bool:
        cfg = self.intake.current()
        try:
            drop = await asyncio.to_thread(read_drop, path, cfg.limits.max_message_size)
        except FileNotFoundError:
            return False
        except (_Corrupt, OSError) as exc:
            await asyncio.to_thread(self._set_aside, path, str(exc))
            return False
        recipients, orcpt = self._recipients(path, drop)
        if not recipients:
            await asyncio.to_thread(self._set_aside, path, "no recipient left to deliver to")
            return False
        try:
            dsn = _drop_dsn(drop.envelope)
        except DsnSyntaxError as exc:
            await asyncio.to_thread(self._set_aside, path, f"bad DSN request: {exc}")
            return False
        queue_id = await self._queue_id(path, drop, recipients)
        if queue_id is None:
            return False
        trace = pickup_trace(cfg.host.name, drop.uid, queue_id, datetime.now(UTC).astimezone())
        body, written = self.intake.take(queue_id, trace, drop.data)
        arrival = Arrival(
            drop.envelope.sender, tuple(recipients), written, f"uid={drop.uid}", "sendmail",
            ret=dsn.ret, envid=dsn.envid, orcpt=orcpt,
            notify=dict.fromkeys(recipients, dsn.notify) if dsn.notify else {},
        )
        try:
            await self.intake.admit(arrival, body)
        except DkimKeyError as exc:  # the file stays; the next scan tries again
            log.error("maildrop: %s: not queued, cannot sign: %s", path.name, exc)
            return False
        except Exception as exc:  # the file stays; the next scan tries again
            log.error("maildrop: %s: cannot queue: %s", path.name, exc)
            return False
        finally:
            body.close()
        await asyncio.to_thread(_unlink, path)
        return True

    def _recipients(self, path: Path, drop: _Drop) -> tuple[list[str], dict[str, str]]:
        """The drop's recipients resolved (an unknown local user is logged and left out), and
        the original recipient of each alias target, as the listener keeps them
        (``dsn_smtp.keep_rcpt_dsn``)."""
        policy = self.intake.policy()
        recipients: list[str] = []
        orcpt: dict[str, str] = {}
        for rcpt in drop.envelope.recipients:
            try:
                targets = policy.resolve_recipients([rcpt])
                recipients += targets
                if targets != [rcpt]:
                    orcpt.update((t, orcpt_of(rcpt)) for t in targets if t not in orcpt)
            except UnknownLocalUser as exc:
                log.error("maildrop: %s: uid %d: %s", path.name, drop.uid, exc)
        return recipients, orcpt

    async def _queue_id(self, path: Path, drop: _Drop, recipients: list[str]) -> str | None:
        """The id derived from the file; None when it is queued already (then the file is
        removed) or the queue cannot be read (it stays for the next scan)."""
        sender = self.intake.policy().sender(drop.envelope.sender)
        queue_id = derived_queue_id(drop.mtime_ns // 1_000_000,
                                    f"{drop.uid}/{path.name}".encode("utf-8", "surrogateescape"))
        try:
            existing = await self.store.get(queue_id)
        except Exception as exc:  # the file stays; the next scan tries again
            log.error("maildrop: %s: cannot read the queue: %s", path.name, exc)
            return None
        if existing is None:
            return queue_id
        if (existing.sender, [r.address for r in existing.recipients]) == (sender, recipients):
            # Queued before a crash stopped the delete: once is enough.
            log.info("%s: %s was queued already; removing it", queue_id, path.name)
            await asyncio.to_thread(_unlink, path)
            return None
        return new_queue_id()  # a different message that happens to share the id

    def _set_aside(self, path: Path, why: str) -> None:
        target = self.queue_path / CORRUPT / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("maildrop: %s: %s; cannot move it aside: %s", path.name, why, exc)
            return
        log.error("maildrop: %s: %s; moved to %s", path.name, why, target)


@dataclass(frozen=True)
class _DropDsn:
    notify: str | None
    ret: str | None
    envid: str | None


def _drop_dsn(envelope: DropEnvelope) -> _DropDsn:
    """The RFC 3461 request of a drop file (``sendmail -N -R -V``), checked as the listener
    checks MAIL and RCPT parameters: a user may write any file, not only what sendmail
    writes. ``DsnSyntaxError`` when one is malformed."""
    return _DropDsn(
        notify=None if envelope.notify is None else parse_notify(envelope.notify),
        ret=None if envelope.ret is None else parse_ret(envelope.ret).value,
        envid=None if envelope.envid is None else check_envid(envelope.envid),
    )


def _waiting(directory: Path) -> list[str]:
    """Drop files in arrival order; removes temp files a dead sendmail left long ago."""
    names = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if is_temp_name(entry.name):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < _now() - STALE_TEMP:
                    os.unlink(entry.path)
            continue
        names.append(entry.name)
    return sorted(names)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
