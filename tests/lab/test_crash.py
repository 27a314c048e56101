"""docs/architecture.md, "Durability": a kill -9 at any instant loses no acknowledged message.

The end-to-end proof is ``bench/crash`` (``bench/crash_harness.py``): a real ``deliverd run``
SIGKILLed repeatedly while submissions stream in and deliveries to a slow sink are in flight.
Around it, the harness's own bookkeeping and the start-up recovery it found missing.
"""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from pathlib import Path

import pytest
from bench.crash_harness import (
    EXIT_OK,
    CountingSink,
    CrashOptions,
    main,
    message_bytes,
    run_crash,
    tally,
)

from deliverd.queue.database import QueueDB, RcptState, RecipientUpdate
from deliverd.queue.message import NewMessage
from deliverd.queue.store import QueueStore

# --- the harness run: kill -9 during submission and during delivery ----------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_during_submission_and_delivery_loses_no_acknowledged_message(
        tmp_path: Path) -> None:
    report = run_crash(CrashOptions(
        rounds=10, sessions=3, rate=150.0, sink_delay=0.05, drain_timeout=60.0,
        workdir=tmp_path / "crash",
    ))
    t = report.tally
    detail = f"{report.to_json()}\nengine log tail:\n{report.engine_log_tail}"
    assert len(report.rounds) == 10
    assert t.acknowledged >= 100, detail  # enough traffic for the kills to mean something
    assert t.lost == (), detail
    assert report.drained and report.still_queued == 0, detail
    assert t.unknown_delivered == (), detail
    assert t.delivered_unique >= t.acknowledged, detail
    # Not vacuous: the engine died with mail queued, with submissions half-way through SMTP,
    # and with deliveries between DATA and the sink's reply.
    assert report.kills_with_queue_nonempty >= 1, detail
    assert report.kills_with_submissions_in_flight >= 1, detail
    assert report.kills_with_deliveries_in_flight >= 1, detail


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_of_a_daemon_with_smtp_workers_loses_no_acknowledged_message(
        tmp_path: Path) -> None:
    """The same kills with the sessions in an SMTP worker: a worker answers 250 only after the
    daemon's commit, and exits by itself once the daemon is gone (the harness waits for it)."""
    report = run_crash(CrashOptions(
        rounds=8, sessions=3, rate=150.0, sink_delay=0.05, drain_timeout=60.0,
        smtp_workers=1, workdir=tmp_path / "crash-workers",
    ))
    t = report.tally
    detail = f"{report.to_json()}\nengine log tail:\n{report.engine_log_tail}"
    assert len(report.rounds) == 8
    assert t.acknowledged >= 80, detail
    assert t.lost == (), detail
    assert report.drained and report.still_queued == 0, detail
    assert t.unknown_delivered == (), detail
    assert report.kills_with_submissions_in_flight >= 1, detail


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_in_the_middle_of_streamed_large_messages_leaves_no_half_message(
        tmp_path: Path) -> None:
    report = run_crash(CrashOptions(
        rounds=5, sessions=2, rate=0.0, size=2 * 1024 * 1024, sink_delay=0.0,
        kill_min=0.5, kill_max=2.0, max_per_round=40, drain_timeout=120.0,
        workdir=tmp_path / "crash-big",
    ))
    t = report.tally
    detail = f"{report.to_json()}\nengine log tail:\n{report.engine_log_tail}"
    assert t.acknowledged >= 1, detail  # (a loaded machine acknowledges few in 5 short rounds)
    assert t.lost == (), detail
    assert report.damaged == [], detail  # every delivered body whole, none cut at the kill
    assert report.drained and report.still_queued == 0, detail
    assert t.unknown_delivered == (), detail
    # Not vacuous: kills landed while 2 MiB submissions were on the wire.
    assert report.kills_with_submissions_in_flight >= 1, detail


def test_the_sink_notices_a_body_that_is_not_the_one_submitted() -> None:
    sink = CountingSink(0.0, size=200_000)
    whole = message_bytes("tok-1", "u@x.test", 200_000)
    sink._record(whole, "s@x.test")
    sink._record(whole[:-30_000] + whole[-20:], "s@x.test")  # the middle cut out
    assert sink.damaged == ["tok-1"]
    assert sink.counts()["tok-1"] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_command_line_writes_json_and_exits_zero_when_nothing_is_lost(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    code = main(["--rounds", "2", "--sessions", "2", "--rate", "80", "--kill-max", "0.6",
                 "--workdir", str(tmp_path / "w"), "--json", str(out), "--quiet"])
    assert code == EXIT_OK
    text = out.read_text()
    assert '"lost_count": 0' in text and '"drained": true' in text


# --- start-up recovery: a kill between "record" and "finish" ------------------------------------


async def test_message_settled_just_before_a_crash_is_removed_on_restart(tmp_path: Path) -> None:
    # The state a kill -9 leaves between the scheduler's record() and finish() writes.
    with QueueDB.open(tmp_path / "queue") as db:
        settled = db.enqueue(NewMessage(
            "a@x.test", ["b@y.test", "c@y.test"], b"Subject: s\r\n\r\nx\r\n"))
        db.record(settled, [RecipientUpdate("b@y.test", RcptState.DELIVERED),
                            RecipientUpdate("c@y.test", RcptState.BOUNCED)])
        open_one = db.enqueue(NewMessage(
            "a@x.test", ["d@y.test", "e@y.test"], b"Subject: s\r\n\r\nx\r\n"))
        db.record(open_one, [RecipientUpdate("d@y.test", RcptState.DELIVERED)])
    store = await QueueStore.open(tmp_path / "queue")
    try:
        assert await store.get(settled) is None
        remaining = await store.get(open_one)
        assert remaining is not None
        assert [r.state for r in remaining.recipients] == [RcptState.DELIVERED,
                                                           RcptState.PENDING]
    finally:
        await store.close()


# --- the harness's bookkeeping ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempted", "acked", "rejected", "delivered", "lost", "dups", "unacked", "unacked_dlv"),
    [
        # every acknowledged token delivered once
        (["a", "b"], ["a", "b"], [], {"a": 1, "b": 1}, (), 0, 0, 0),
        # an acknowledged token that never arrived is lost
        (["a", "b"], ["a", "b"], [], {"a": 1}, ("b",), 0, 0, 0),
        # redelivery after a kill is a duplicate, not a loss
        (["a"], ["a"], [], {"a": 3}, (), 2, 0, 0),
        # cut off before the 250: unacknowledged, arriving or not is fine
        (["a", "b", "c"], ["a"], [], {"a": 1, "b": 1}, (), 0, 2, 1),
        # a definite refusal is neither acknowledged nor in flight
        (["a", "b"], ["a"], ["b"], {"a": 1}, (), 0, 0, 0),
    ],
)
def test_tally_counts_lost_duplicates_and_unacknowledged(
        attempted: list[str], acked: list[str], rejected: list[str], delivered: dict[str, int],
        lost: tuple[str, ...], dups: int, unacked: int, unacked_dlv: int) -> None:
    t = tally(attempted, acked, rejected, Counter(delivered))
    assert t.lost == lost
    assert t.duplicates == dups
    assert t.unacknowledged == unacked
    assert t.unacknowledged_delivered == unacked_dlv
    assert t.rejected == len(rejected)


def test_tally_flags_a_delivery_nobody_submitted() -> None:
    t = tally(["a"], ["a"], [], Counter({"a": 1, "zz": 1}))
    assert t.unknown_delivered == ("zz",)


def test_sink_counts_the_token_of_the_message_not_one_quoted_by_a_dsn() -> None:
    sink = CountingSink(delay=0)
    original = message_bytes("tok1", "u@dest.test")
    sink._record(original, "bench@sender.test")
    dsn = (b"From: MAILER-DAEMON@deliverd.bench\r\nMessage-ID: <x@deliverd.bench>\r\n\r\n"
           b"report\r\n\r\n" + original)
    sink._record(dsn, "")
    assert sink.counts() == Counter({"tok1": 1})
    assert sink.dsn_count == 1 and sink.total == 2


@pytest.mark.integration
def test_sink_holds_each_delivery_and_counts_it_once_accepted() -> None:
    sink = CountingSink(delay=0.3).start()
    try:
        began = time.monotonic()
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
            smtp.sendmail("a@x.test", ["b@y.test"], message_bytes("tok2", "b@y.test"))
        assert time.monotonic() - began >= 0.3
        assert sink.counts() == Counter({"tok2": 1})
        assert sink.in_flight == 0
    finally:
        sink.stop()
