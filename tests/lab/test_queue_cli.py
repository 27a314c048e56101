"""``deliverd queue ...`` and ``deliverd send`` as the operator runs them: real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deliverd.queue.database import QueueDB, RcptState, RecipientUpdate
from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered

EXIT_OK, EXIT_UNKNOWN_ID, EXIT_CONFIG = 0, 1, 2


@pytest.fixture
def config(tmp_path: Path) -> Path:
    spec = {
        "version": 1,
        "host": {"name": "relay.deliverd.test"},
        "queue": {"path": str(tmp_path / "queue")},
        "limits": {"max_hops": 5},
    }
    config_path, _ = write_rendered(normalise(spec), tmp_path / "etc")
    return config_path


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    return tmp_path / "queue"


def deliverd(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "deliverd", *args], input=stdin, capture_output=True,
        timeout=60,
    )
    return subprocess.CompletedProcess(done.args, done.returncode,
                                       done.stdout.decode(), done.stderr.decode())


def queue_json(config: Path) -> list[dict[str, Any]]:
    done = deliverd("queue", "-c", str(config), "list", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    entries: list[dict[str, Any]] = json.loads(done.stdout)
    return entries


def send(config: Path, *args: str, stdin: bytes | None = None) -> str:
    done = deliverd("send", "-c", str(config), *args, stdin=stdin)
    assert done.returncode == EXIT_OK, done.stderr
    return done.stdout.split()[0]


def test_list_of_a_queue_that_never_existed_is_empty(config: Path, queue_dir: Path) -> None:
    done = deliverd("queue", "-c", str(config), "list")
    assert (done.returncode, done.stdout) == (EXIT_OK, "Mail queue is empty\n")
    assert queue_json(config) == []
    assert not queue_dir.exists()  # looking does not create the daemon's spool


def test_send_queues_a_generated_message_and_list_shows_it(config: Path) -> None:
    qid = send(config, "--from", "ops@example.test", "--to", "a@example.test",
               "--to", "b@example.test")
    (entry,) = queue_json(config)
    assert entry["queue_id"] == qid and entry["sender"] == "ops@example.test"
    assert [(r["address"], r["state"]) for r in entry["recipients"]] == [
        ("a@example.test", "pending"), ("b@example.test", "pending")]
    assert entry["held"] is False
    table = deliverd("queue", "list", "-c", str(config)).stdout
    assert qid in table and "<ops@example.test>" in table and "<b@example.test>  pending" in table


def test_show_prints_envelope_state_and_headers(config: Path, queue_dir: Path) -> None:
    qid = send(config, "--from", "ops@example.test", "--to", "a@example.test",
               "--subject", "preflight")
    with QueueDB.open(queue_dir, create=False) as db:
        db.record(qid, [RecipientUpdate("a@example.test", RcptState.DEFERRED, time.time() + 60,
                                        "4.4.1", "connect to mx[192.0.2.1]:25: refused")])
    done = deliverd("queue", "-c", str(config), "show", qid)
    assert done.returncode == EXIT_OK, done.stderr
    out = done.stdout
    assert f"queue id:  {qid}" in out and "sender:    <ops@example.test>" in out
    assert "<a@example.test>  deferred  attempts=1" in out
    assert "diagnostic: connect to mx[192.0.2.1]:25: refused" in out
    headers = out.split("headers:\n", 1)[1]
    for name in ("Received: by relay.deliverd.test", "From: <ops@example.test>",
                 "To: <a@example.test>", "Subject: preflight", "Date: ",
                 "Message-ID: <"):
        assert name in headers
    shown = json.loads(deliverd("queue", "-c", str(config), "show", qid, "--json").stdout)
    assert shown["queue_id"] == qid and "Subject: preflight" in shown["headers"]
    assert shown["recipients"][0]["last_status"] == "4.4.1"


def test_send_reads_a_file_and_stdin_with_crlf_line_ends(
    config: Path, queue_dir: Path, tmp_path: Path
) -> None:
    message = tmp_path / "msg.eml"
    message.write_bytes(b"Subject: from a file\n\ncaf\xc3\xa9\n")
    from_file = send(config, "--from", "ops@example.test", "--to", "a@example.test",
                     str(message))
    from_stdin = send(config, "--from", "", "--to", "a@example.test", "-",
                      stdin=b"Subject: from stdin\r\n\r\nhi\n")
    with QueueDB.open(queue_dir, create=False) as db:
        file_data = db.read_data(from_file)
        assert file_data.endswith(b"Subject: from a file\r\n\r\ncaf\xc3\xa9\r\n")
        assert file_data.startswith(b"Received: by relay.deliverd.test")
        file_msg = db.get(from_file)
        assert file_msg is not None and file_msg.eightbit
        assert db.read_data(from_stdin).endswith(b"Subject: from stdin\r\n\r\nhi\r\n")
        stdin_msg = db.get(from_stdin)
        assert stdin_msg is not None and stdin_msg.sender == ""


def test_send_holds_a_message_that_already_looped(config: Path) -> None:
    looping = b"Received: from a by b; now\r\n" * 6 + b"Subject: loop\r\n\r\nx\r\n"
    done = deliverd("send", "-c", str(config), "--from", "a@example.test", "--to",
                    "b@example.test", "-", stdin=looping)
    assert done.returncode == EXIT_OK and "held: mail loop: 6 hops" in done.stdout
    (entry,) = queue_json(config)
    assert entry["held"] is True and entry["hold_reason"] == "mail loop: 6 hops"


def test_send_refuses_a_malformed_address(config: Path) -> None:
    done = deliverd("send", "-c", str(config), "--from", "a@example.test", "--to", "not an addr")
    assert done.returncode == EXIT_CONFIG and "invalid recipient" in done.stderr
    assert queue_json(config) == []


def test_hold_release_delete_and_their_exit_codes(config: Path) -> None:
    qid = send(config, "--from", "ops@example.test", "--to", "a@example.test")
    assert deliverd("queue", "-c", str(config), "hold", qid).returncode == EXIT_OK
    (entry,) = queue_json(config)
    assert entry["held"] is True and entry["recipients"][0]["state"] == "held"
    assert "HELD (operator)" in deliverd("queue", "-c", str(config), "list").stdout

    assert deliverd("queue", "-c", str(config), "release", qid).returncode == EXIT_OK
    (entry,) = queue_json(config)
    assert entry["held"] is False and entry["recipients"][0]["state"] == "deferred"
    assert entry["recipients"][0]["next_attempt"] <= time.time()

    assert deliverd("queue", "-c", str(config), "delete", qid).returncode == EXIT_OK
    assert queue_json(config) == []
    for action in ("show", "hold", "release", "delete"):
        done = deliverd("queue", "-c", str(config), action, qid)
        assert done.returncode == EXIT_UNKNOWN_ID, action
        assert "no such message" in done.stderr


def test_flush_makes_deferred_recipients_due_now(config: Path, queue_dir: Path) -> None:
    qid = send(config, "--from", "ops@example.test", "--to", "a@example.test")
    later = time.time() + 3600
    with QueueDB.open(queue_dir, create=False) as db:
        db.record(qid, [RecipientUpdate("a@example.test", RcptState.DEFERRED, later)])
        assert db.due(time.time()) == []
    done = deliverd("queue", "-c", str(config), "flush", "--json")
    assert done.returncode == EXIT_OK
    assert json.loads(done.stdout) == {"flushed": 1, "daemon_signalled": False}
    with QueueDB.open(queue_dir, create=False) as db:
        assert [m.queue_id for m in db.due(time.time())] == [qid]


@pytest.mark.parametrize("content", [None, "not = [valid toml", "version = 1\n"])
def test_config_errors_exit_2(tmp_path: Path, content: str | None) -> None:
    config = tmp_path / "deliverd.toml"
    if content is not None:
        config.write_text(content)
    for args in (("queue", "-c", str(config), "list"),
                 ("send", "-c", str(config), "--from", "a@b.test", "--to", "c@d.test")):
        done = deliverd(*args)
        assert done.returncode == EXIT_CONFIG, done
        assert done.stderr.startswith("deliverd:")


# -- waking the daemon -------------------------------------------------------------------------

# Stands in for the daemon: its command line names deliverd, it writes the pid file the way
# deliverd.daemon does and reports each SIGUSR1 and SIGUSR2 on stdout.
_FAKE_DAEMON = textwrap.dedent(
    """
    # deliverd stand-in
    import os, signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *_: print("SIGUSR1", flush=True))
    signal.signal(signal.SIGUSR2, lambda *_: print("SIGUSR2", flush=True))
    with open(os.path.join(sys.argv[1], "deliverd.pid"), "w") as fh:
        fh.write(f"{os.getpid()}\\n")
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def fake_daemon(queue_dir: Path) -> Iterator[subprocess.Popen[str]]:
    queue_dir.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-c", _FAKE_DAEMON, str(queue_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield proc
    proc.kill()
    proc.wait(10)


def test_flush_release_and_send_signal_the_running_daemon(
    config: Path, fake_daemon: subprocess.Popen[str]
) -> None:
    assert fake_daemon.stdout is not None
    qid = send(config, "--from", "ops@example.test", "--to", "a@example.test")
    assert fake_daemon.stdout.readline() == "SIGUSR1\n"
    flushed = deliverd("queue", "-c", str(config), "flush")
    assert flushed.returncode == EXIT_OK and "daemon signalled" in flushed.stdout
    assert fake_daemon.stdout.readline() == "SIGUSR2\n"  # flush: also forget failed hosts
    held = deliverd("queue", "-c", str(config), "hold", qid)
    assert held.returncode == EXIT_OK, held.stdout + held.stderr
    released = deliverd("queue", "-c", str(config), "release", qid, "--json")
    assert released.returncode == EXIT_OK, released.stdout + released.stderr
    assert json.loads(released.stdout)["daemon_signalled"] is True
    assert fake_daemon.stdout.readline() == "SIGUSR1\n"
    assert fake_daemon.poll() is None


def test_stale_pid_file_naming_another_process_is_not_signalled(
    config: Path, queue_dir: Path
) -> None:
    queue_dir.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (queue_dir / "deliverd.pid").write_text(f"{bystander.pid}\n")
        done = deliverd("queue", "-c", str(config), "flush", "--json")
        assert json.loads(done.stdout)["daemon_signalled"] is False
        time.sleep(0.2)
        assert bystander.poll() is None  # SIGUSR1 would have killed it
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait(10)
    (queue_dir / "deliverd.pid").write_text(f"{bystander.pid}\n")  # now dead
    done = deliverd("queue", "-c", str(config), "flush", "--json")
    assert done.returncode == EXIT_OK
    assert json.loads(done.stdout)["daemon_signalled"] is False
