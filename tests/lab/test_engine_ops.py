"""Operating the daemon through its interfaces: SIGHUP reload, SIGTERM, and the queue CLI
against a running engine (smart host mode to a local sink, so no DNS is involved)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.engine import Engine, textfile_samples
from tests.fixtures.smtp_sink import Sink, free_port

pytestmark = pytest.mark.integration

SENDER = "alice@example.test"


def relay_spec(port: int, **smarthost: Any) -> dict[str, Any]:
    return {
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none", **smarthost}},
        "dsn": {"notify_delayed": False},
    }


def wait_exit(engine: Engine, timeout: float) -> int:
    assert engine.proc is not None
    return engine.proc.wait(timeout)


def test_sighup_applies_a_valid_new_config(engine_factory: Callable[..., Engine],
                                           smtp_sink: Callable[..., Sink]) -> None:
    first, second = smtp_sink(), smtp_sink()
    engine = engine_factory(relay_spec(first.port))
    engine.submit(SENDER, ["bob@example.net"])
    engine.wait_status("bob@example.net", "sent")
    engine.reconfigure(relay_spec(second.port))
    engine.signal(signal.SIGHUP)
    engine.wait_for(lambda: "reloaded" in engine.log_text(), what="reload")
    engine.submit(SENDER, ["carol@example.net"])
    engine.wait_status("carol@example.net", "sent")
    assert [m.rcpt_tos for m in second.messages] == [("carol@example.net",)]
    assert len(first.messages) == 1


def test_sighup_with_a_bad_config_keeps_the_running_one(engine_factory: Callable[..., Engine],
                                                        smtp_sink: Callable[..., Sink]) -> None:
    sink = smtp_sink()
    engine = engine_factory(relay_spec(sink.port))
    text = engine.config.read_text()
    engine.config.write_text(text.replace(f"port = {sink.port}", "port = 70000"))
    engine.signal(signal.SIGHUP)
    engine.wait_for(lambda: "reload refused" in engine.log_text(), what="refused reload")
    assert "/routing/smarthost/port" in engine.log_text()
    engine.submit(SENDER, ["bob@example.net"])
    engine.wait_status("bob@example.net", "sent")
    assert len(sink.messages) == 1
    assert engine.proc is not None and engine.proc.poll() is None


def test_sigterm_requeues_in_flight_delivery_and_restart_delivers(
        engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]) -> None:
    port = free_port()
    stalled = smtp_sink("127.0.0.1", port, stall={"dot": 30})
    engine = engine_factory({**relay_spec(port), "timeouts": {"data_response": "60s"}},
                            start=False)
    engine.run_args = ("--stop-grace", "0.5")
    engine.start()
    queue_id = engine.submit(SENDER, ["bob@example.net"])
    engine.wait_for(lambda: any("DATA" in s.commands for s in stalled.sessions),
                    what="DATA in flight")
    started = time.monotonic()
    engine.signal(signal.SIGTERM)
    assert wait_exit(engine, 15) == 0
    assert time.monotonic() - started < 10
    (entry,) = engine.queue()
    assert entry["queue_id"] == queue_id
    assert entry["recipients"][0]["state"] in ("pending", "deferred")
    healthy = smtp_sink("127.0.0.1", free_port())
    engine.reconfigure(relay_spec(healthy.port))
    engine.start()
    engine.wait_status("bob@example.net", "sent")
    assert healthy.messages[0].rcpt_tos == ("bob@example.net",)


def test_queue_hold_release_flush_delete_against_a_running_engine(
        engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]) -> None:
    port = free_port()
    busy = smtp_sink("127.0.0.1", port, greeting="421 4.3.2 busy")
    engine = engine_factory({**relay_spec(port),
                             "retry": {"temp_error_delay": "1h", "interval": "1h",
                                       "max_interval": "4h", "expire_after": "1d"}})
    config = str(engine.config)
    keep = engine.submit(SENDER, ["bob@example.net"])
    drop = engine.submit(SENDER, ["carol@example.net"])
    engine.wait_status("bob@example.net", "deferred")
    engine.wait_status("carol@example.net", "deferred")

    assert engine.cli("queue", "-c", config, "hold", keep).returncode == 0
    held = {e["queue_id"]: e for e in engine.queue()}[keep]
    assert held["held"] is True

    assert engine.cli("queue", "-c", config, "delete", drop).returncode == 0
    assert [e["queue_id"] for e in engine.queue()] == [keep]
    assert engine.cli("queue", "-c", config, "delete", drop, check=False).returncode == 1

    busy.stop()
    healthy = smtp_sink("127.0.0.1", port)
    # held mail stays put even when flushed
    engine.cli("queue", "-c", config, "flush")
    time.sleep(1.5)
    assert not healthy.messages
    # release makes it due now and wakes the daemon (SIGUSR1): no 1h wait
    assert engine.cli("queue", "-c", config, "release", keep).returncode == 0
    engine.wait_status("bob@example.net", "sent", timeout=15)
    assert healthy.messages[0].rcpt_tos == ("bob@example.net",)
    engine.wait_for(lambda: engine.queue() == [], what="empty queue")


def test_flush_retries_deferred_mail_now(engine_factory: Callable[..., Engine],
                                         smtp_sink: Callable[..., Sink]) -> None:
    port = free_port()
    busy = smtp_sink("127.0.0.1", port, greeting="421 4.3.2 busy")
    engine = engine_factory({**relay_spec(port),
                             "retry": {"temp_error_delay": "1h", "interval": "1h",
                                       "max_interval": "4h", "expire_after": "1d"}})
    engine.submit(SENDER, ["bob@example.net"])
    engine.wait_status("bob@example.net", "deferred")
    busy.stop()
    healthy = smtp_sink("127.0.0.1", port)
    result = engine.cli("queue", "-c", str(engine.config), "flush")
    assert result.returncode == 0
    engine.wait_status("bob@example.net", "sent", timeout=15)
    assert len(healthy.messages) == 1


def test_send_command_enqueues_into_the_running_engine(engine_factory: Callable[..., Engine],
                                                       smtp_sink: Callable[..., Sink]) -> None:
    sink = smtp_sink()
    engine = engine_factory(relay_spec(sink.port))
    result = engine.cli("send", "-c", str(engine.config), "--from", SENDER,
                        "--to", "bob@example.net")
    assert result.returncode == 0, result.stderr
    engine.wait_status("bob@example.net", "sent")
    assert sink.messages[0].mail_from == SENDER


def test_metrics_textfile_counts_attempts_and_survives_a_stop(
    engine_factory: Callable[..., Engine], smtp_sink: Callable[..., Sink]
) -> None:
    sink = smtp_sink()
    engine = engine_factory(relay_spec(sink.port))
    engine.submit(SENDER, ["bob@example.net", "carol@example.net"])
    engine.wait_status("carol@example.net", "sent")
    assert engine.stop() == 0
    written = textfile_samples(engine)
    assert written[("deliverd_delivery_attempts_total", (("result", "sent"),))] == 2
    assert written[("deliverd_recipients_total", (("route", "smarthost"), ("status", "sent")))] == 2


def test_a_queue_the_engine_cannot_open_is_one_log_line_not_a_traceback(
    engine_factory: Callable[..., Engine],
) -> None:
    engine = engine_factory(start=False)
    blocker = engine.workdir / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    engine.reconfigure({"queue": {"path": str(blocker / "queue")}})
    proc = subprocess.run([sys.executable, "-m", "deliverd", "run", "-c", str(engine.config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert f"cannot open the queue {blocker / 'queue'} as " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
