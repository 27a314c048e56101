"""``deliverd queue list`` filters and streaming, and ``deliverd queue summary`` (qshape)."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deliverd.cli.queue import message_json, write_json_lines
from deliverd.queue.database import QueueDB, RcptState, RecipientUpdate
from deliverd.queue.message import NewMessage
from deliverd.queue.summary import AGE_BOUNDS_MINUTES, format_summary, summarise, summary_json
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered

NOW = 1_700_000_000.0
MINUTE = 60.0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    spec = {"version": 1, "host": {"name": "relay.deliverd.test"},
            "queue": {"path": str(tmp_path / "queue")}}
    config_path, _ = write_rendered(normalise(spec), tmp_path / "etc")
    return config_path


def deliverd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deliverd", "queue", "-c", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def listed(config: Path, *args: str) -> list[dict[str, Any]]:
    done = deliverd(config, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found


@pytest.fixture
def queue(tmp_path: Path) -> dict[str, str]:
    """Four messages of known age and state (ages relative to the real clock: the CLI's)."""
    now = time.time()
    ids: dict[str, str] = {}
    with QueueDB.open(tmp_path / "queue") as db:
        ids["old_deferred"] = db.enqueue(NewMessage(
            "a@x.test", ["bob@slow.example", "eve@fast.example"], b"x"), now=now - 3 * 3600)
        ids["old_pending"] = db.enqueue(NewMessage(
            "a@x.test", ["carol@fast.example"], b"x"), now=now - 2 * 3600)
        ids["held"] = db.enqueue(NewMessage(
            "a@x.test", ["dan@Slow.Example"], b"x", hold_reason="loop"), now=now - 600)
        ids["new"] = db.enqueue(NewMessage(
            "a@x.test", ["frank@slow_example.test"], b"x"), now=now - 5)
        db.record(ids["old_deferred"], [
            RecipientUpdate("bob@slow.example", RcptState.DEFERRED, now + 600, "4.4.1", "x")])
    return ids


def test_list_without_filters_streams_every_message_oldest_first(
    config: Path, queue: dict[str, str]
) -> None:
    assert [m["queue_id"] for m in listed(config)] == [
        queue["old_deferred"], queue["old_pending"], queue["held"], queue["new"]]


@pytest.mark.parametrize(("args", "expected"), [
    (("--state", "deferred"), ["old_deferred"]),
    (("--state", "held"), ["held"]),
    (("--state", "pending"), ["old_deferred", "old_pending", "new"]),
    (("--domain", "slow.example"), ["old_deferred", "held"]),  # case-insensitive
    (("--domain", "SLOW.EXAMPLE"), ["old_deferred", "held"]),
    (("--domain", "slow_example.test"), ["new"]),
    (("--domain", "slowXexample.test"), []),  # "_" is not a wildcard
    (("--state", "deferred", "--domain", "fast.example"), []),  # the same recipient must match
    (("--state", "pending", "--domain", "fast.example"), ["old_deferred", "old_pending"]),
    (("--older-than", "1h"), ["old_deferred", "old_pending"]),
    (("--older-than", "150m"), ["old_deferred"]),
    (("--limit", "2"), ["old_deferred", "old_pending"]),
    (("--state", "pending", "--limit", "1"), ["old_deferred"]),
])
def test_list_filters(
    config: Path, queue: dict[str, str], args: tuple[str, ...], expected: list[str]
) -> None:
    assert [m["queue_id"] for m in listed(config, *args)] == [queue[k] for k in expected]


def test_list_table_obeys_the_filters_too(config: Path, queue: dict[str, str]) -> None:
    done = deliverd(config, "list", "--state", "held")
    assert done.returncode == 0, done.stderr
    assert queue["held"] in done.stdout and queue["new"] not in done.stdout
    assert done.stdout.rstrip().endswith("-- 1 messages, 1 recipients")
    nothing = deliverd(config, "list", "--domain", "nowhere.example")
    assert nothing.stdout == "Mail queue is empty\n"


@pytest.mark.parametrize("args", [("--older-than", "soon"), ("--limit", "0"),
                                  ("--state", "bounced")])
def test_list_refuses_bad_filter_values(config: Path, args: tuple[str, ...]) -> None:
    done = deliverd(config, "list", *args)
    assert done.returncode == 2 and args[0] in done.stderr


def test_paging_returns_each_message_once_across_chunk_borders(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path / "q") as db:
        ids = [db.enqueue(NewMessage("a@x.test", [f"r{i}@d{i % 3}.test"], b"x"), now=NOW + i)
               for i in range(23)]
        assert [m.queue_id for m in db.iter_messages(chunk=5)] == ids
        assert [m.queue_id for m in db.iter_messages(chunk=5, limit=11)] == ids[:11]
        assert [m.queue_id for m in db.iter_messages(chunk=5, domain="d1.test")] == ids[1::3]
        assert [m.recipients[0].address for m in db.iter_messages(chunk=4, limit=2)] == [
            "r0@d0.test", "r1@d1.test"]


@pytest.mark.parametrize("documents", [[], ['{"a":1}'], ['{"a":[1,2]}', '{"b":{"c":null}}']])
def test_streamed_json_lines_make_one_array(documents: list[str]) -> None:
    out = io.StringIO()
    write_json_lines(iter(documents), out)
    assert json.loads(out.getvalue()) == [json.loads(d) for d in documents]
    lines = out.getvalue().splitlines()
    # "[", one line per document, "]"; or "[]" alone
    assert len(lines) == (len(documents) + 2 if documents else 1)


def test_sqlite_rendered_json_equals_the_python_view_of_every_message(tmp_path: Path) -> None:
    with QueueDB.open(tmp_path / "q") as db:
        plain = db.enqueue(NewMessage(
            "a@x.test", ["b@y.test", "c@y.test"], b"x"), now=NOW + 0.123456789)
        db.enqueue(NewMessage("", ["postmaster@x.test"], b"x", is_dsn=True), now=NOW + 1)
        db.enqueue(NewMessage(
            "ü@x.test", ["ñ@y.test"], b"x", smtputf8=True, eightbit=True,
            hold_reason='loop "quoted"\\'), now=NOW + 2)
        db.record(plain, [RecipientUpdate("c@y.test", RcptState.DEFERRED, NOW + 600.5, "4.4.1",
                                          "smtp; 421 4.4.1 \"busy\"\ttab", "mx[192.0.2.1]:25")])
        db.mark_delay_notified(plain)
        python_view = [message_json(m) for m in db.iter_messages()]
        sqlite_view = [json.loads(text) for text in db.iter_json(chunk=2)]
    assert sqlite_view == python_view
    assert [list(m) for m in sqlite_view] == [list(m) for m in python_view]  # key order too
    assert sqlite_view[0]["arrival"] == NOW + 0.123456789  # floats read back exactly


# --- summary -----------------------------------------------------------------------------------


def test_summarise_puts_the_busiest_domains_first_and_adds_up_the_rest() -> None:
    counts = [("a.test", 0, 1), ("b.test", 0, 5), ("b.test", 9, 2), ("c.test", 3, 4),
              ("d.test", 1, 4)]
    summary = summarise(counts, top=2)
    assert [r.domain for r in summary.top] == ["b.test", "c.test"]  # 7, then 4 (c before d)
    assert summary.top[0].ages == (5, 0, 0, 0, 0, 0, 0, 0, 0, 2)
    assert summary.total.total == 16 and summary.total.ages[0] == 6
    assert summary.others is not None and summary.others.total == 5
    assert summary_json(summary)["other_domains"] == {
        "count": 2, "total": 5, "ages": [1, 4, 0, 0, 0, 0, 0, 0, 0, 0]}
    assert summarise(counts, top=0).others is None


def test_summary_text_has_qshape_columns() -> None:
    text = format_summary(summarise([("b.test", 0, 5), ("b.test", 9, 2)], top=10))
    header, total, row = text.splitlines()
    assert header.split() == ["T", *[str(b) for b in AGE_BOUNDS_MINUTES], "1280+"]
    assert total.split() == ["TOTAL", "7", "5", *["0"] * 8, "2"]
    assert row.split()[:3] == ["b.test", "7", "5"]


def test_database_counts_recipients_by_domain_and_age_bucket(tmp_path: Path) -> None:
    bounds = [60.0 * m for m in AGE_BOUNDS_MINUTES]
    with QueueDB.open(tmp_path / "q") as db:
        db.enqueue(NewMessage("a@x.test", ["one@A.test", "two@a.test"], b"x"), now=NOW - 2 * MINUTE)
        first = db.enqueue(NewMessage(
            "a@x.test", ["three@b.test", "four@a.test"], b"x"), now=NOW - 7 * MINUTE)
        db.enqueue(NewMessage("a@x.test", ["five@b.test"], b"x"), now=NOW - 3000 * MINUTE)
        db.enqueue(NewMessage("a@x.test", ["six@c.test"], b"x", hold_reason="operator"), now=NOW)
        db.record(first, [RecipientUpdate("four@a.test", RcptState.DELIVERED)])
        open_rows = db.recipients_by_domain_and_age(
            NOW, [RcptState.PENDING, RcptState.DEFERRED], bounds)
        held_rows = db.recipients_by_domain_and_age(NOW, [RcptState.HELD], bounds)
    assert sorted(open_rows) == [("a.test", 0, 2), ("b.test", 1, 1), ("b.test", 9, 1)]
    assert held_rows == [("c.test", 0, 1)]


def test_summary_command_in_text_and_json(config: Path, queue: dict[str, str]) -> None:
    done = deliverd(config, "summary", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    # Open (pending + deferred) recipients: bob (deferred), eve, carol, frank; dan is held.
    assert data["total"]["total"] == 4
    domains = {d["domain"]: d["total"] for d in data["domains"]}
    assert domains == {"fast.example": 2, "slow.example": 1, "slow_example.test": 1}
    held = json.loads(deliverd(config, "summary", "--json", "--state", "held").stdout)
    assert [(d["domain"], d["total"]) for d in held["domains"]] == [("slow.example", 1)]
    top1 = json.loads(deliverd(config, "summary", "--json", "--top", "1").stdout)
    assert [d["domain"] for d in top1["domains"]] == ["fast.example"]
    assert top1["other_domains"]["count"] == 2
    text = deliverd(config, "summary").stdout
    assert text.splitlines()[1].split()[:2] == ["TOTAL", "4"]


def test_state_filter_looks_up_each_message_by_its_key_not_through_the_state_index(
    tmp_path: Path,
) -> None:
    # Through the (state, next_attempt) index, the per-message check walks every recipient in
    # that state: quadratic in the queue's size (seconds for --limit 100 at 100,000 queued).
    from deliverd.queue.listing import _list_filter
    from deliverd.queue.records import MSG_COLS as _MSG_COLS

    with QueueDB.open(tmp_path / "q") as db:
        db.enqueue(NewMessage("a@x.test", ["b@y.test"], b"x"))
    where, params = _list_filter(RcptState.DEFERRED, "y.test", None)
    conn = sqlite3.connect(tmp_path / "q" / "queue.db")
    plan = [row[3] for row in conn.execute(
        f"EXPLAIN QUERY PLAN SELECT {_MSG_COLS} FROM messages m WHERE {where}"
        " ORDER BY m.queue_id LIMIT ?", ["", *params, 100])]
    conn.close()
    assert not any("recipients_due" in step for step in plan), plan
    assert any("(queue_id=?)" in step for step in plan), plan
