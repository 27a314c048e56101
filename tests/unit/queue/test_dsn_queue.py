"""RFC 3461 requests in the queue: the version-4 columns, their migration from an older queue,
and the pickup carrying ``sendmail -N -R -V`` from a real maildrop (or setting a forged
request aside)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deliverd.config.model import Config, DsnConfig, HostConfig, LocalConfig
from deliverd.queue.database import DB_NAME, SCHEMA_VERSION, QueueDB
from deliverd.queue.message import NewMessage
from deliverd.queue.store import QueueStore
from deliverd.submission.cleanup import Intake
from deliverd.submission.maildrop import DropEnvelope, prepare, write_drop
from deliverd.submission.pickup import Pickup

HOST = "web1.deliverd.test"
CFG = Config(
    host=HostConfig(HOST), dsn=DsnConfig(f"postmaster@{HOST}"),
    local=LocalConfig(("localhost", HOST), HOST, (("root", ("ops@example.com",)),)),
)
MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


def test_enqueue_keeps_ret_envid_and_per_recipient_notify_and_orcpt(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path) as db:
        qid = db.enqueue(NewMessage(
            "a@x.test", ["b@y.test", "c@y.test"], MESSAGE, ret="FULL", envid="env 1",
            notify={"b@y.test": "NEVER"}, orcpt={"c@y.test": "rfc822;C@Y.test"}))
        msg = db.get(qid)
        assert msg is not None
        assert (msg.ret, msg.envid) == ("FULL", "env 1")
        assert [(r.notify, r.orcpt) for r in msg.recipients] == [
            ("NEVER", None), (None, "rfc822;C@Y.test")]
        [listed] = list(db.iter_messages())
        assert listed == msg


def test_a_version_3_queue_gets_the_dsn_columns_and_keeps_its_messages(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path) as db:
        old = db.enqueue(NewMessage("a@x.test", ["b@y.test"], MESSAGE))
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # what version 3 left on disk
        for table, column in (("messages", "dsn_ret"), ("messages", "dsn_envid"),
                              ("recipients", "dsn_notify"), ("recipients", "dsn_orcpt")):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 3")
    with QueueDB.open(tmp_path) as db:
        before = db.get(old)
        assert before is not None and before.ret is None
        assert before.recipients[0].notify is None
        new = db.enqueue(NewMessage(
            "a@x.test", ["b@y.test"], MESSAGE, ret="HDRS", notify={"b@y.test": "SUCCESS"}))
        after = db.get(new)
        assert after is not None and after.ret == "HDRS"
        assert after.recipients[0].notify == "SUCCESS"
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[tuple[Path, QueueStore, list[str]]]:
    path = tmp_path / "queue"
    store = await QueueStore.open(path)
    prepare(path)
    yield path, store, []
    await store.close()


def _pickup(path: Path, store: QueueStore, woken: list[str]) -> Pickup:
    return Pickup(path, store, Intake(store, lambda: CFG, lambda qid, _source: woken.append(qid)))


@pytest.mark.integration
async def test_pickup_queues_sendmails_dsn_request_with_orcpt_for_aliases(
    queue: tuple[Path, QueueStore, list[str]],
) -> None:
    path, store, woken = queue
    write_drop(path, DropEnvelope("root", ("root", "x@example.org"), notify="SUCCESS,FAILURE",
                                  ret="FULL", envid="cron-42"), [MESSAGE], min_free=0)
    assert await _pickup(path, store, woken).scan() == 1
    msg = await store.get(woken[0])
    assert msg is not None
    assert (msg.ret, msg.envid) == ("FULL", "cron-42")
    assert [(r.address, r.notify, r.orcpt) for r in msg.recipients] == [
        ("ops@example.com", "SUCCESS,FAILURE", "rfc822;root"),  # what the user wrote
        ("x@example.org", "SUCCESS,FAILURE", None),
    ]


@pytest.mark.integration
@pytest.mark.parametrize("envelope", [
    DropEnvelope("root", ("x@example.org",), notify="SOMETIMES"),
    DropEnvelope("root", ("x@example.org",), ret="BODY"),
    DropEnvelope("root", ("x@example.org",), envid="tab\there"),
])
async def test_pickup_sets_aside_a_drop_file_with_a_forged_dsn_request(
    queue: tuple[Path, QueueStore, list[str]], envelope: DropEnvelope,
) -> None:
    path, store, woken = queue
    name = write_drop(path, envelope, [MESSAGE], min_free=0)
    assert await _pickup(path, store, woken).scan() == 0
    assert woken == [] and await store.list_messages() == []
    assert (path / "corrupt" / name).exists()
