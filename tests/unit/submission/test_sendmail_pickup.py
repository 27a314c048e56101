"""The daemon's pickup against a real maildrop and queue: what it queues, what it sets aside in
``corrupt/`` (never deleted in silence, never hanging on what a user planted), and that a file
is deleted only once its message is in the queue."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deliverd.config.model import (
    Config,
    DsnConfig,
    HostConfig,
    LimitsConfig,
    LocalConfig,
    MasqueradeConfig,
)
from deliverd.queue.store import QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.maildrop import DropEnvelope, prepare, write_drop
from deliverd.submission.pickup import STALE_TEMP, Pickup

pytestmark = pytest.mark.integration

HOST = "web1.deliverd.test"
CFG = Config(
    host=HostConfig(HOST), dsn=DsnConfig(f"postmaster@{HOST}"),
    limits=LimitsConfig(max_message_size=4096),
    local=LocalConfig(("localhost", HOST), HOST, (("root", ("ops@example.com",)),)),
    masquerade=MasqueradeConfig("example.com"),
)
MESSAGE = b"From: root\r\nSubject: x\r\n\r\nbody\r\n"


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[tuple[Path, QueueStore, list[str]]]:
    path = tmp_path / "queue"
    store = await QueueStore.open(path)
    prepare(path)
    yield path, store, []
    await store.close()


def _pickup(queue: tuple[Path, QueueStore, list[str]]) -> Pickup:
    path, store, woken = queue
    return Pickup(path, store, Intake(store, lambda: CFG, lambda qid, _source: woken.append(qid)))


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _drop(path: Path, envelope: DropEnvelope, data: bytes = MESSAGE) -> Path:
    name = write_drop(path, envelope, [data], min_free=0)
    return path / "maildrop" / name


async def test_a_drop_file_is_queued_traced_with_its_owner_and_then_deleted(
    queue: tuple[Path, QueueStore, list[str]],
) -> None:
    path, store, woken = queue
    drop = _drop(path, DropEnvelope("root", ("root", "x@example.org")))
    assert await _pickup(queue).scan() == 1
    assert not drop.exists()
    [qid] = woken
    msg = await store.get(qid)
    assert msg is not None
    assert msg.sender == "root@example.com"
    assert [r.address for r in msg.recipients] == ["ops@example.com", "x@example.org"]
    data = await store.read_data(qid)
    assert data.startswith(f"Received: by {HOST} (deliverd pickup, from userid {os.getuid()})"
                           .encode())
    assert b"\r\nFrom: root@example.com\r\n" in data


@pytest.mark.parametrize(
    "plant",
    [
        "bad envelope",
        "no recipients",
        "fifo",
        "symlink",
        "hard link",
        "too big",
        "only unknown local users",
    ],
)
async def test_what_can_never_be_queued_is_set_aside_with_a_log_line(
    queue: tuple[Path, QueueStore, list[str]], plant: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, store, woken = queue
    maildrop = path / "maildrop"
    name = "planted"
    if plant == "bad envelope":
        (maildrop / name).write_bytes(b"not json\n" + MESSAGE)
    elif plant == "no recipients":
        (maildrop / name).write_bytes(b'{"v": 1, "sender": "a@b.c", "recipients": []}\n')
    elif plant == "fifo":
        os.mkfifo(maildrop / name)
    elif plant == "symlink":
        secret = tmp_path / "secret"
        secret.write_bytes(DropEnvelope("a@b.c", ("x@example.org",)).to_line() + MESSAGE)
        (maildrop / name).symlink_to(secret)
    elif plant == "hard link":
        first = _drop(path, DropEnvelope("a@b.c", ("x@example.org",)))
        os.link(first, maildrop / name)
        first.unlink()
        os.link(maildrop / name, tmp_path / "second-link")
    elif plant == "too big":
        _drop(path, DropEnvelope("a@b.c", ("x@example.org",)), b"x" * 5000).rename(
            maildrop / name)
    else:
        _drop(path, DropEnvelope("a@b.c", ("bob@localhost",))).rename(maildrop / name)
    with caplog.at_level(logging.ERROR, logger="deliverd.submission.pickup"):
        assert await _pickup(queue).scan() == 0
    assert woken == []
    assert await store.list_messages() == []
    assert _lexists(path / "corrupt" / name)
    assert not _lexists(maildrop / name)
    assert any(name in r.getMessage() and "moved to" in r.getMessage() for r in caplog.records)


async def test_a_drop_stays_when_the_queue_cannot_take_it(
    queue: tuple[Path, QueueStore, list[str]],
) -> None:
    path, store, _ = queue
    drop = _drop(path, DropEnvelope("a@b.c", ("x@example.org",)))
    await store.close()  # every enqueue now fails
    assert await _pickup(queue).scan() == 0
    assert drop.exists()


async def test_temp_files_of_a_dead_sendmail_are_removed_only_when_stale(
    queue: tuple[Path, QueueStore, list[str]],
) -> None:
    path, _, _ = queue
    stale = path / "maildrop" / ".old.tmp"
    fresh = path / "maildrop" / ".new.tmp"
    for temp in (stale, fresh):
        temp.write_bytes(b"partial")
    old = time.time() - STALE_TEMP - 60
    os.utime(stale, (old, old))
    assert await _pickup(queue).scan() == 0
    assert not stale.exists() and fresh.exists()


async def test_a_file_queued_before_a_crash_stopped_its_delete_is_not_queued_twice(
    queue: tuple[Path, QueueStore, list[str]], tmp_path: Path,
) -> None:
    path, store, woken = queue
    drop = _drop(path, DropEnvelope("root", ("x@example.org",)))
    saved = tmp_path / "saved"
    shutil.copy2(drop, saved)  # same bytes, owner and mtime: what a crash would leave
    assert await _pickup(queue).scan() == 1
    shutil.copy2(saved, drop)  # the delete after the commit never happened
    assert await _pickup(queue).scan() == 0
    assert not _lexists(drop)
    assert len(woken) == 1 and len(await store.list_messages()) == 1


async def test_files_in_the_same_millisecond_are_each_queued(
    queue: tuple[Path, QueueStore, list[str]],
) -> None:
    path, store, _ = queue
    drops = [_drop(path, DropEnvelope("root", ("x@example.org",))) for _ in range(50)]
    stamp = drops[0].stat().st_mtime_ns
    for drop in drops:
        os.utime(drop, ns=(stamp, stamp))
    assert await _pickup(queue).scan() == 50
    assert len(await store.list_messages()) == 50
