"""The durable queue: semantics of every operation, group commit, disk full, crash safety."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deliverd.queue.database import DB_NAME, is_queue_id, new_queue_id
from deliverd.queue.message import NewMessage
from deliverd.queue.store import (
    QueueDB,
    QueueFullError,
    QueueStore,
    RcptState,
    RecipientUpdate,
)

BODY = b"From: a@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await QueueStore.open(tmp_path / "queue")
    yield s
    await s.close()


# -- queue ids -----------------------------------------------------------------------------------


def test_queue_ids_are_unique_sortable_and_short() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_queue_id(i) and len(i) == 13 for i in ids)


def test_queue_ids_sort_by_time() -> None:
    assert new_queue_id(1_000.0) < new_queue_id(1_000.002) < new_queue_id(2_000_000_000.0)


# -- enqueue and reads -------------------------------------------------------------------------


async def test_enqueue_stores_envelope_body_and_pending_recipients(store: QueueStore) -> None:
    before = time.time()
    qid = await store.enqueue(NewMessage(
        "a@example.test", ["b@example.test", "c@example.test", "b@example.test"], BODY,
        smtputf8=True, eightbit=True))
    msg = await store.get(qid)
    assert msg is not None
    assert msg.queue_id == qid and msg.sender == "a@example.test"
    assert msg.size == len(BODY) and before <= msg.arrival <= time.time()
    assert msg.smtputf8 and msg.eightbit and not msg.is_dsn
    assert not msg.held and msg.hold_reason is None and not msg.delay_notified
    assert [r.address for r in msg.recipients] == ["b@example.test", "c@example.test"]
    assert {r.state for r in msg.recipients} == {RcptState.PENDING}
    assert {r.attempts for r in msg.recipients} == {0}
    assert await store.read_data(qid) == BODY


async def test_enqueue_without_recipients_is_refused(store: QueueStore) -> None:
    with pytest.raises(ValueError):
        await store.enqueue(NewMessage("a@example.test", [], BODY))
    assert await store.list_messages() == []


async def test_unknown_id_reads_as_missing(store: QueueStore) -> None:
    assert await store.get("0000000000000") is None
    with pytest.raises(KeyError):
        await store.read_data("0000000000000")


async def test_enqueue_with_a_chosen_id_keeps_it(store: QueueStore) -> None:
    chosen = new_queue_id()
    assert await store.enqueue(NewMessage(
        "a@x.test", ["b@y.test"], BODY, queue_id=chosen)) == chosen


async def test_enqueue_with_a_colliding_id_gets_a_fresh_one(store: QueueStore) -> None:
    first = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    second = await store.enqueue(NewMessage("a@x.test", ["c@y.test"], b"other", queue_id=first))
    assert second != first
    assert await store.read_data(first) == BODY
    assert await store.read_data(second) == b"other"


async def test_null_sender_and_dsn_flag_are_kept(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("", ["b@y.test"], BODY, is_dsn=True))
    msg = await store.get(qid)
    assert msg is not None and msg.sender == "" and msg.is_dsn


# -- due, record, next_wakeup ------------------------------------------------------------------


async def test_pending_messages_are_due_at_once(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    assert [m.queue_id for m in await store.due(time.time())] == [qid]


async def test_deferred_recipient_is_due_only_from_its_next_attempt(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, 1_000.0,
                                             "4.4.1", "connect refused", "mx[192.0.2.1]:25")])
    assert await store.due(999.0) == []
    assert [m.queue_id for m in await store.due(1_000.0)] == [qid]
    assert await store.next_wakeup() == 1_000.0


async def test_record_counts_attempts_and_keeps_last_diagnostic(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, 50.0, "4.2.0",
                                             "smtp; 421 busy", "mx[192.0.2.1]:25")])
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, 80.0, "4.4.1",
                                             "connect refused")])
    msg = await store.get(qid)
    assert msg is not None
    b, c = msg.recipients
    assert (b.state, b.attempts, b.next_attempt) == (RcptState.DEFERRED, 2, 80.0)
    assert (b.last_status, b.last_diagnostic) == ("4.4.1", "connect refused")
    assert b.last_relay == "mx[192.0.2.1]:25"  # not overwritten by an update without one
    assert (c.state, c.attempts) == (RcptState.PENDING, 0)


async def test_record_for_a_deleted_message_is_ignored(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.delete(qid)
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED)])
    assert await store.get(qid) is None


async def test_due_respects_limit_and_orders_pending_before_deferred(store: QueueStore) -> None:
    deferred = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.record(deferred, [RecipientUpdate("b@y.test", RcptState.DEFERRED, 10.0)])
    pending = [await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY)) for _ in range(3)]
    assert [m.queue_id for m in await store.due(100.0, limit=2)] == pending[:2]
    assert [m.queue_id for m in await store.due(100.0)] == [*pending, deferred]


async def test_message_with_only_final_recipients_is_not_due(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED, status="2.0.0")])
    assert await store.due(time.time() + 10**6) == []
    assert await store.next_wakeup() is None


async def test_next_wakeup_is_the_earliest_deferred(store: QueueStore) -> None:
    assert await store.next_wakeup() is None
    for at in (500.0, 300.0, 900.0):
        qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
        await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, at)])
    assert await store.next_wakeup() == 300.0


async def test_mark_delay_notified_is_stored(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.mark_delay_notified(qid)
    msg = await store.get(qid)
    assert msg is not None and msg.delay_notified


# -- finish, delete, flush, hold, release ----------------------------------------------------


async def test_finish_keeps_a_message_with_an_open_recipient(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED)])
    assert await store.finish(qid) is False
    assert await store.read_data(qid) == BODY


async def test_finish_removes_message_and_body_when_all_final(
    store: QueueStore, tmp_path: Path
) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED),
                             RecipientUpdate("c@y.test", RcptState.BOUNCED, status="5.1.1")])
    assert await store.finish(qid) is True
    assert await store.get(qid) is None
    with pytest.raises(KeyError):
        await store.read_data(qid)
    assert await store.finish(qid) is False
    with sqlite3.connect(tmp_path / "queue" / DB_NAME) as conn:
        for table in ("messages", "bodies", "recipients"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)


async def test_held_recipient_is_not_final(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("b@y.test", RcptState.HELD, diagnostic="loop")])
    assert await store.finish(qid) is False


async def test_delete_removes_whatever_the_state(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    assert await store.delete(qid) is True
    assert await store.get(qid) is None
    assert await store.delete(qid) is False


async def test_flush_makes_every_deferred_recipient_due_now(store: QueueStore) -> None:
    later = time.time() + 3600
    ids = []
    for _ in range(3):
        qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
        await store.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, later)])
        ids.append(qid)
    assert await store.due(time.time()) == []
    assert await store.flush() == 3
    assert sorted(m.queue_id for m in await store.due(time.time())) == ids
    assert await store.flush() == 0


async def test_hold_takes_a_message_out_of_due_and_release_puts_it_back(
    store: QueueStore,
) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    await store.record(qid, [RecipientUpdate("c@y.test", RcptState.DELIVERED)])
    assert await store.hold(qid, "suspicious") is True
    held = await store.get(qid)
    assert held is not None and held.held and held.hold_reason == "suspicious"
    assert [r.state for r in held.recipients] == [RcptState.HELD, RcptState.DELIVERED]
    assert await store.due(time.time() + 10**6) == []

    assert await store.release(qid) is True
    released = await store.get(qid)
    assert released is not None and not released.held and released.hold_reason is None
    assert [r.state for r in released.recipients] == [RcptState.DEFERRED, RcptState.DELIVERED]
    assert released.recipients[0].next_attempt <= time.time()
    assert [m.queue_id for m in await store.due(time.time())] == [qid]


async def test_hold_and_release_of_unknown_id_say_so(store: QueueStore) -> None:
    assert await store.hold("0000000000000") is False
    assert await store.release("0000000000000") is False


async def test_enqueue_held_for_a_loop_is_listed_but_never_due(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage(
        "a@x.test", ["b@y.test"], BODY, hold_reason="mail loop: 31 hops"))
    msg = await store.get(qid)
    assert msg is not None and msg.held and msg.hold_reason == "mail loop: 31 hops"
    assert msg.recipients[0].state is RcptState.HELD
    assert await store.due(time.time()) == []
    assert [m.queue_id for m in await store.list_messages()] == [qid]


async def test_list_messages_returns_everything_oldest_first(store: QueueStore) -> None:
    ids = [await store.enqueue(NewMessage("a@x.test", [f"r{i}@y.test"], BODY)) for i in range(5)]
    await store.hold(ids[2])
    listed = await store.list_messages()
    assert [m.queue_id for m in listed] == ids
    assert [m.recipients[0].address for m in listed] == [f"r{i}@y.test" for i in range(5)]


# -- group commit, durability across reopen ---------------------------------------------------


async def test_concurrent_enqueues_share_few_commits(store: QueueStore) -> None:
    start = store.commits
    ids = await asyncio.gather(
        *(store.enqueue(NewMessage("a@x.test", [f"r{i}@y.test"], BODY)) for i in range(300))
    )
    assert len(set(ids)) == 300
    commits = store.commits - start
    assert 1 <= commits <= 30, commits
    assert len(await store.list_messages()) == 300


async def test_writes_survive_close_and_reopen(tmp_path: Path) -> None:
    s = await QueueStore.open(tmp_path / "queue")
    qid = await s.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    await s.record(qid, [RecipientUpdate("b@y.test", RcptState.DEFERRED, 42.0, "4.0.0", "x")])
    await s.hold(qid, "kept")
    before = await s.get(qid)
    await s.close()
    s2 = await QueueStore.open(tmp_path / "queue")
    try:
        assert await s2.get(qid) == before
        assert await s2.read_data(qid) == BODY
    finally:
        await s2.close()


async def test_queue_directory_and_database_are_private(tmp_path: Path) -> None:
    s = await QueueStore.open(tmp_path / "spool" / "queue")
    await s.close()
    assert stat.S_IMODE((tmp_path / "spool" / "queue").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "spool" / "queue" / DB_NAME).stat().st_mode) == 0o600


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = await QueueStore.open(tmp_path / "queue")
    await s.close()
    with pytest.raises(Exception, match="closed"):
        await s.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))


def test_sync_db_sees_what_the_async_store_wrote(tmp_path: Path) -> None:
    async def write() -> str:
        s = await QueueStore.open(tmp_path / "queue")
        try:
            return await s.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
        finally:
            await s.close()

    qid = asyncio.run(write())
    with QueueDB.open(tmp_path / "queue", create=False) as db:
        assert [m.queue_id for m in db.list_messages()] == [qid]
        assert db.flush() == 0
        assert db.hold(qid) and db.release(qid) and db.delete(qid)


async def test_cli_connection_and_daemon_store_work_side_by_side(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    with QueueDB.open(store.path, create=False) as cli:
        assert cli.hold(qid, "operator")
        more = await asyncio.gather(*(store.enqueue(NewMessage("a@x.test", ["c@y.test"], BODY))
                                      for _ in range(20)))
        assert len(cli.list_messages()) == 21
    msg = await store.get(qid)
    assert msg is not None and msg.held
    assert len(await store.due(time.time())) == len(more)


# -- storage failures ----------------------------------------------------------------------------


def _shrink(db: QueueDB, pages: int) -> None:
    # SQLite's own "database is full" (SQLITE_FULL), reached portably without a small disk.
    db._conn.execute(f"PRAGMA max_page_count = {pages}")


def test_database_full_raises_queue_full_and_stores_nothing_of_the_message(
    tmp_path: Path,
) -> None:
    with QueueDB.open(tmp_path / "queue") as db:
        kept = db.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
        (pages,) = db._conn.execute("PRAGMA page_count").fetchone()
        _shrink(db, pages + 2)
        with pytest.raises(QueueFullError):
            db.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], os.urandom(64 * 1024)))
        assert [m.queue_id for m in db.list_messages()] == [kept]
        for table in ("bodies", "recipients"):
            assert db._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (1,)
        # Space again: the same connection goes on working.
        _shrink(db, 10**6)
        assert db.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY)) != kept


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.integration
async def test_real_full_disk_fails_enqueue_cleanly_and_keeps_acknowledged_mail(
    tmp_path: Path,
) -> None:
    with _tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        store = await QueueStore.open(disk / "queue")
        acknowledged: list[str] = []
        try:
            with pytest.raises(QueueFullError):
                for i in range(100):
                    acknowledged.append(
                        await store.enqueue(NewMessage(
                            "a@x.test", [f"r{i}@y.test"], os.urandom(60_000)))
                    )
            assert 3 <= len(acknowledged) < 100
            listed = await store.list_messages()
            assert [m.queue_id for m in listed] == acknowledged
            for qid in acknowledged:
                assert len(await store.read_data(qid)) == 60_000
        finally:
            await store.close()
        with QueueDB.open(disk / "queue", create=False) as db:
            assert [m.queue_id for m in db.list_messages()] == acknowledged


# -- kill -9 -------------------------------------------------------------------------------------

_ENQUEUER = textwrap.dedent(
    """
    import asyncio, os, sys
    from deliverd.queue.store import NewMessage, QueueStore

    async def worker(store, n):
        while True:
            qid = await store.enqueue(NewMessage("a@x.test", [f"r{n}@y.test"], os.urandom(2000)))
            print(qid, flush=True)

    async def main():
        store = await QueueStore.open(sys.argv[1])
        await asyncio.gather(*(worker(store, n) for n in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    acknowledged: set[str] = set()
    rng = random.Random(1234)
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _ENQUEUER, str(queue)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        wanted = rng.randint(5, 400)
        seen = []
        for line in proc.stdout:
            seen.append(line.strip())
            if len(seen) >= wanted:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert len(seen) == wanted, "enqueuer died before the kill"
        acknowledged.update(seen)
        with QueueDB.open(queue, create=False) as db:
            present = {m.queue_id for m in db.list_messages()}
            missing = acknowledged - present
            assert not missing, f"lost {len(missing)} acknowledged messages"
            for qid in seen[-3:]:
                assert len(db.read_data(qid)) == 2000


# -- the scheduler's batched operations ------------------------------------------------------------

async def test_settle_records_and_removes_a_finished_message_in_one_commit(
    store: QueueStore,
) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    before = store.commits
    removed = await store.settle(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED)])
    assert removed is True
    assert await store.get(qid) is None
    assert store.commits == before + 1


async def test_settle_keeps_a_message_with_an_open_recipient(store: QueueStore) -> None:
    qid = await store.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
    removed = await store.settle(qid, [
        RecipientUpdate("b@y.test", RcptState.DELIVERED),
        RecipientUpdate("c@y.test", RcptState.DEFERRED, next_attempt=time.time() + 60,
                        status="4.4.1", diagnostic="x-deliverd; connection refused"),
    ])
    assert removed is False
    message = await store.get(qid)
    assert message is not None
    states = {r.address: r.state for r in message.recipients}
    assert states == {"b@y.test": RcptState.DELIVERED, "c@y.test": RcptState.DEFERRED}


async def test_due_with_data_skips_excluded_ids_and_returns_bodies(store: QueueStore) -> None:
    first = await store.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
    second = await store.enqueue(NewMessage("a@x.test", ["c@y.test"], BODY + b"second\r\n"))
    due = await store.due_with_data(time.time(), limit=10, exclude=frozenset({first}))
    assert [(m.queue_id, data) for m, data in due] == [(second, BODY + b"second\r\n")]
    assert [m.queue_id for m in await store.due(time.time(), exclude=frozenset({second}))] == [
        first
    ]


def test_read_many_returns_the_bodies_of_existing_ids_only(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path / "queue") as db:
        ids = [db.enqueue(NewMessage(
            "a@x.test", [f"r{n}@y.test"], BODY + str(n).encode())) for n in range(3)]
        found = db.read_many([*ids, "NOSUCHID00000"])
    assert found == {qid: BODY + str(n).encode() for n, qid in enumerate(ids)}


def test_settled_lists_only_messages_whose_recipients_are_all_final(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path / "queue") as db:
        done = db.enqueue(NewMessage("a@x.test", ["b@y.test", "c@y.test"], BODY))
        open_one = db.enqueue(NewMessage("a@x.test", ["d@y.test", "e@y.test"], BODY))
        db.record(done, [RecipientUpdate("b@y.test", RcptState.DELIVERED),
                         RecipientUpdate("c@y.test", RcptState.BOUNCED)])
        db.record(open_one, [RecipientUpdate("d@y.test", RcptState.DELIVERED)])
        assert db.settled() == [done]


async def test_store_open_removes_messages_left_settled_by_a_crash(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path / "queue") as db:
        qid = db.enqueue(NewMessage("a@x.test", ["b@y.test"], BODY))
        db.record(qid, [RecipientUpdate("b@y.test", RcptState.DELIVERED)])  # no finish: a crash
    store = await QueueStore.open(tmp_path / "queue")
    try:
        assert await store.get(qid) is None
        assert await store.list_messages() == []
    finally:
        await store.close()
