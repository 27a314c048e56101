"""The role's systemd path under a real systemd: a Debian 12 container booted with systemd-nspawn
(``deliverd_lab.sdbox``), Ansible running inside it, no route to any package index.

The tests run in file order on one container, as a host's life goes: a check run on the fresh
host, the first converge, a second one, a check run and a real run of a spec change, a unit
change, an engine change, a wedged engine, and removal. Each asserts on what systemd itself
reports. The container root is built once and cached under ``.cache/`` (tests/fixtures/sdbox.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.role import recap_changed
from tests.fixtures.sdbox import IN_WHEELS, IN_WORK, REPO, SdBox, booted, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

if os.geteuid() != 0:
    pytest.skip("booting a systemd container (systemd-nspawn) needs root", allow_module_level=True)

UNIT = "deliverd.service"
UNIT_FILE = "/etc/systemd/system/deliverd.service"
ENGINE = "/opt/deliverd/venv/bin/deliverd"
CONFIG = "/etc/deliverd/deliverd.toml"
LISTEN_PORT, SINK_PORT, SINK2_PORT = 2526, 2525, 2527  # the container's own loopback
WATCHDOG_SEC = 3
SENDER = "app@sdbox.deliverd.test"


def _spec(sink_port: int = SINK_PORT, listen_port: int = LISTEN_PORT) -> dict[str, object]:
    return {
        "version": 1,
        "host": {"name": "sdbox.deliverd.test"},
        "listen": [{"address": "127.0.0.1", "port": listen_port}],
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none"}},
        "retry": {"temp_error_delay": "1m"},
    }


def _vars(spec: dict[str, object] | None = None, **extra: object) -> dict[str, object]:
    return {"deliverd_spec": spec or _spec(), "deliverd_install_from": "wheelhouse",
            "deliverd_wheelhouse": IN_WHEELS, "deliverd_watchdog_sec": WATCHDOG_SEC,
            "ansible_python_interpreter": "/usr/bin/python3", **extra}


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def box(sdbox_wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdBox]:
    work = tmp_path_factory.mktemp("sdbox-work")
    with booted(f"deliverd-test-{os.getpid()}", sdbox_wheels, work) as sdbox:
        yield sdbox


def _stop_sink(box: SdBox, port: int) -> None:
    box.run("systemctl", "stop", f"deliverd-test-sink-{port}")


def _submit(box: SdBox, recipient: str, text: str, port: int = LISTEN_PORT) -> str:
    """Submit over SMTP inside the container; the queue id from the 250 reply."""
    reply = box.run("python3", "-c", "import smtplib, sys\n"
                    f"with smtplib.SMTP('127.0.0.1', {port}, timeout=10) as s:\n"
                    f"    s.ehlo(); s.mail({SENDER!r}); s.rcpt({recipient!r})\n"
                    "    print(s.data(sys.argv[1].encode())[1].decode())",
                    f"Subject: systemd test\r\n\r\n{text}\r\n").stdout
    return reply.split()[-1]


def _queue_ids(box: SdBox) -> list[str]:
    listing = json.loads(box.run(ENGINE, "queue", "-c", CONFIG, "list", "--json").stdout)
    return sorted(str(entry["queue_id"]) for entry in listing)


def test_the_container_has_no_route_to_any_package_index(box: SdBox) -> None:
    # The installs below can only succeed from the shipped wheels.
    reach = box.run("python3", "-c", "import socket\n"
                    "for host in ('151.101.0.223', '1.1.1.1'):\n"  # pypi.org's CDN, a resolver
                    "    try:\n"
                    "        socket.create_connection((host, 443), timeout=3).close()\n"
                    "        print('reached', host)\n"
                    "    except OSError as exc:\n"
                    "        print('unreachable', host, exc.errno)\n", check=False).stdout
    assert "reached" not in reach.replace("unreachable", ""), reach
    assert reach.count("unreachable") == 2, reach


def test_check_diff_on_a_fresh_host_reports_the_start_and_changes_nothing(box: SdBox) -> None:
    output = _ok(box.play(_vars(), "--check", "--diff"))
    assert "deliverd.service would be installed, enabled and started" in output
    assert recap_changed(output) > 0
    assert box.run("test", "-e", UNIT_FILE, check=False).returncode != 0
    assert box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"


def test_converge_starts_the_notify_unit_and_mail_reaches_the_smart_host(box: SdBox) -> None:
    maildir = box.start_sink(SINK_PORT)
    _ok(box.play(_vars()))
    assert box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"
    assert box.show(UNIT, "Type") == "notify"
    assert box.show(UNIT, "WatchdogUSec") == f"{WATCHDOG_SEC}s"
    # Type=notify: the start returned after READY=1, so the listener takes mail at once.
    _submit(box, "ops@example.net", "first-message")
    wait_until(lambda: box.delivered(maildir, "first-message"), "delivery to the smart host")
    assert _queue_ids(box) == []  # root's deliverd command reads the queue
    journal = box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    assert "status=sent" in journal  # the log lines are in the journal, not in a file


def test_second_converge_changes_nothing(box: SdBox) -> None:
    assert recap_changed(_ok(box.play(_vars()))) == 0


def test_unit_verifies_with_its_man_page_and_scores_ok_for_security(box: SdBox) -> None:
    verify = box.run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert box.run("man", "-w", "deliverd").stdout.strip()
    assert "deliverd-run" in box.run("man", "-P", "cat", "deliverd-run").stdout
    security = box.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
    score = re.search(r"Overall exposure level for deliverd\.service: ([\d.]+)", security)
    assert score, security
    assert float(score.group(1)) <= 2.0, security


def test_check_diff_on_the_deployed_host_announces_the_reload(box: SdBox) -> None:
    before = box.run("sha256sum", CONFIG).stdout
    output = _ok(box.play(_vars(_spec(SINK2_PORT)), "--check", "--diff"))
    assert "a real run checks it, then reloads deliverd" in output
    assert str(SINK2_PORT) in output  # the config diff
    assert box.run("sha256sum", CONFIG).stdout == before


def test_spec_change_reloads_with_the_main_pid_unchanged_and_the_new_route_applies(
    box: SdBox,
) -> None:
    maildir = box.start_sink(SINK2_PORT)
    pid = box.show(UNIT, "MainPID")
    output = _ok(box.play(_vars(_spec(SINK2_PORT))))
    assert "Reload the engine" in output and "Restart the engine" not in output
    assert box.show(UNIT, "MainPID") == pid
    assert box.show(UNIT, "NRestarts") == "0"
    _submit(box, "ops@example.net", "after-reload")
    wait_until(lambda: box.delivered(maildir, "after-reload"), "delivery to the new smart host")
    assert "reloaded" in box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout


def test_unit_change_restarts_the_engine(box: SdBox) -> None:
    pid = box.show(UNIT, "MainPID")
    output = _ok(box.play(_vars(_spec(SINK2_PORT), deliverd_watchdog_sec=WATCHDOG_SEC + 1)))
    assert "Restart the engine" in output
    assert box.show(UNIT, "MainPID") not in (pid, "0")
    assert box.show(UNIT, "WatchdogUSec") == f"{WATCHDOG_SEC + 1}s"
    _ok(box.play(_vars(_spec(SINK2_PORT))))  # back to the short watchdog for the next test


def test_engine_change_restarts_the_engine(box: SdBox, sdbox_wheels: Path,
                                           tmp_path: Path) -> None:
    # The same version with different code, as a rebuilt checkout gives: a new engine wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "__pycache__", "*.pyc"))
    with (source / "engine" / "deliverd" / "__init__.py").open("a", encoding="utf-8") as init:
        init.write("# rebuilt for the engine-change test\n")
    changed = box.work / "wheels-changed"
    changed.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                    str(changed), str(source)], check=True, timeout=600)
    for wheel in sdbox_wheels.glob("*.whl"):
        if not wheel.name.startswith("deliverd-"):
            shutil.copy2(wheel, changed / wheel.name)
    pid = box.show(UNIT, "MainPID")
    output = _ok(box.play(_vars(_spec(SINK2_PORT),
                                deliverd_wheelhouse=f"{IN_WORK}/wheels-changed")))
    assert "Reinstall the changed engine" in output and "Restart the engine" in output
    assert box.show(UNIT, "MainPID") not in (pid, "0")
    assert box.show(UNIT, "ActiveState") == "active"
    site = box.run("sh", "-c", "echo /opt/deliverd/venv/lib/python3*/site-packages").stdout.strip()
    assert "rebuilt for the engine-change test" in box.run(
        "cat", f"{site}/deliverd/__init__.py").stdout


def test_watchdog_restarts_a_stopped_engine_and_the_queue_is_intact(box: SdBox) -> None:
    _stop_sink(box, SINK2_PORT)  # the next hop is down: the message stays queued
    queue_id = _submit(box, "ops@example.net", "kept-in-the-queue")
    queued = _queue_ids(box)  # with the delay notice to the sender (dsn.notify_delayed)
    assert queue_id in queued, box.run(ENGINE, "queue", "-c", CONFIG, "list").stdout
    pid = box.show(UNIT, "MainPID")
    restarts = int(box.show(UNIT, "NRestarts"))
    box.run("kill", "-STOP", pid)
    wait_until(lambda: int(box.show(UNIT, "NRestarts")) > restarts
          and box.show(UNIT, "ActiveState") == "active", "the watchdog restart",
          timeout=WATCHDOG_SEC + 30)
    assert box.show(UNIT, "MainPID") not in (pid, "0")
    journal = box.run("journalctl", "-u", UNIT, "--no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert _queue_ids(box) == queued
    maildir = box.start_sink(SINK2_PORT)
    box.run(ENGINE, "queue", "-c", CONFIG, "flush")
    wait_until(lambda: box.delivered(maildir, "kept-in-the-queue"), "delivery after the restart")


def test_a_listener_below_1024_runs_with_only_the_bind_capability(box: SdBox) -> None:
    # Port 25 needs CAP_NET_BIND_SERVICE, so the unit keeps that one capability and drops
    # PrivateUsers (a user namespace would take it away): the engine must still bind and deliver.
    maildir = f"/var/tmp/sink-{SINK2_PORT}"
    if box.run("systemctl", "is-active", f"deliverd-test-sink-{SINK2_PORT}",
               check=False).stdout.strip() != "active":
        maildir = box.start_sink(SINK2_PORT)
    _ok(box.play(_vars(_spec(SINK2_PORT, listen_port=25))))
    wait_until(lambda: box.show(UNIT, "ActiveState") == "active", "the unit active again")
    assert box.show(UNIT, "CapabilityBoundingSet") == "cap_net_bind_service"
    assert box.show(UNIT, "PrivateUsers") == "no"
    _submit(box, "ops@example.net", "through-port-25", port=25)
    wait_until(lambda: box.delivered(maildir, "through-port-25"), "delivery from port 25")
    security = box.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
    score = re.search(r"Overall exposure level for deliverd\.service: ([\d.]+)", security)
    assert score and float(score.group(1)) <= 2.0, security


def test_smtp_workers_run_under_the_hardened_unit_and_go_with_it(box: SdBox) -> None:
    # limits.smtp_workers: the daemon spawns its workers under the same sandbox (system call
    # filter, no new privileges, the bind capability on port 25) and systemd sees them in the
    # unit's cgroup; a reload replaces them, a stop ends them all.
    maildir = f"/var/tmp/sink-{SINK2_PORT}"
    since = box.run("date", "+@%s").stdout.strip()
    spec = {**_spec(SINK2_PORT, listen_port=25), "limits": {"smtp_workers": 2}}
    _ok(box.play(_vars(spec)))
    # The converge ends with the reload its handler asked for; on a busy machine the daemon may
    # still be starting its workers (systemd says "reloading") when the play returns.
    wait_until(lambda: box.show(UNIT, "ActiveState") == "active", "the unit active again")
    pid = box.show(UNIT, "MainPID")

    def workers() -> list[str]:
        found = box.run("pgrep", "-P", pid, "-f", "deliverd.worker", check=False).stdout
        return sorted(found.split())

    wait_until(lambda: len(workers()) == 2, "two SMTP workers")
    first = workers()
    _submit(box, "ops@example.net", "through-a-worker", port=25)
    wait_until(lambda: box.delivered(maildir, "through-a-worker"), "delivery via a worker")
    box.run("systemctl", "reload", UNIT)
    wait_until(lambda: len(workers()) == 2 and not set(workers()) & set(first),
               "two new workers after the reload")
    assert box.show(UNIT, "MainPID") == pid
    _submit(box, "ops@example.net", "after-the-worker-reload", port=25)
    wait_until(lambda: box.delivered(maildir, "after-the-worker-reload"), "delivery after reload")
    box.run("systemctl", "stop", UNIT)
    assert box.show(UNIT, "ActiveState") == "inactive"
    assert box.run("pgrep", "-f", "deliverd.worker", check=False).stdout.strip() == ""
    journal = box.run("journalctl", "-u", UNIT, "--since", since, "--no-pager").stdout
    assert "SMTP worker" in journal and "accepting" in journal
    assert "Traceback" not in journal, journal[-3000:]
    assert "timed out" not in journal and "Killing" not in journal, journal[-3000:]
    box.run("systemctl", "start", UNIT)


def test_a_queue_the_service_user_cannot_reach_fails_the_run_with_the_reason(
    box: SdBox,
) -> None:
    box.run("install", "-d", "-m", "0700", "/srv/locked")  # root's only: deliverd cannot enter
    spec = _spec(SINK2_PORT)
    spec["queue"] = {"path": "/srv/locked/queue"}
    box.run("systemctl", "stop", UNIT)
    proc = box.play(_vars(spec))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "deliverd did not start; its journal ends with:" in output, output[-4000:]
    assert "cannot open the queue /srv/locked/queue as deliverd: " in output, output[-4000:]
    assert "Traceback" not in output


def test_absent_stops_and_removes_the_unit(box: SdBox) -> None:
    _ok(box.play(_vars(deliverd_state="absent", deliverd_purge_queue=True)))
    assert box.run("test", "-e", UNIT_FILE, check=False).returncode != 0
    assert box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    assert UNIT not in box.run("systemctl", "list-unit-files", "--no-pager").stdout
    assert box.run("systemctl", "cat", UNIT, check=False).returncode != 0
    assert box.run("man", "-w", "deliverd", check=False).returncode != 0
