"""``deliverd probe`` against a real Postfix smart host (SASL via Dovecot, STARTTLS)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from deliverd.spec.normalise import normalise
from deliverd.spec.render import write_rendered
from tests.fixtures.dns import DnsServer
from tests.fixtures.mailservers import SMARTHOST_USERS, SmarthostLab
from tests.fixtures.smtp_sink import SinkFactory, free_port

pytestmark = pytest.mark.integration

ALL_PASSWORDS = (*SMARTHOST_USERS.values(), "Wrong-Smtp-Password-5")


@pytest.fixture
def relay_dns(dns_server_factory: Callable[[Sequence[str]], DnsServer]) -> DnsServer:
    return dns_server_factory(["host-record=relay.test,127.0.0.1"])


def write_config(tmp_path: Path, smarthost: dict[str, Any], nameserver: str,
                 accounts: list[dict[str, Any]] | None = None) -> Path:
    spec = {
        "version": 1,
        "host": {"name": "deliverd.test"},
        "queue": {"path": str(tmp_path / "queue")},
        "routing": {"mode": "smarthost", "smarthost": smarthost},
        "accounts": accounts or [],
        "timeouts": {"connect": "3s", "greeting": "5s", "command": "5s", "dns": "2s"},
        "dns": {"nameservers": [nameserver]},
    }
    config, _ = write_rendered(normalise(spec), tmp_path / "etc")
    return config


def run_probe(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "deliverd", "probe", "-c", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    for password in ALL_PASSWORDS:
        assert password not in done.stdout and password not in done.stderr
    return done


def wait_for(read: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Server logs are written asynchronously: poll ``read`` until it gives something."""
    deadline = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def steps_of(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    report = json.loads(done.stdout)
    return {step["name"]: step for step in report["steps"]}


def relay_smarthost(lab: SmarthostLab, user: str = "relay", password: str | None = None,
                    **extra: Any) -> dict[str, Any]:
    return {
        "host": "relay.test", "port": lab.port, "tls": "starttls", "ca_file": lab.ca_file,
        "auth": {"username": user, "password": password or lab.users[user]}, **extra,
    }


@pytest.mark.slow
def test_probe_with_right_credentials_passes_every_step_and_sends_no_mail(
    postfix_smarthost: SmarthostLab, relay_dns: DnsServer, tmp_path: Path,
) -> None:
    config = write_config(tmp_path, relay_smarthost(postfix_smarthost), relay_dns.nameserver)

    done = run_probe(config, "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["smarthost"] == f"relay.test:{postfix_smarthost.port}"
    steps = steps_of(done)
    assert list(steps) == ["resolve", "credentials", "connect", "ehlo", "tls", "auth", "quit"]
    assert all(step["ok"] for step in steps.values())
    assert "relay.test -> 127.0.0.1" in steps["resolve"]["detail"]
    assert "220 relay.test ESMTP Postfix" in steps["connect"]["detail"]
    assert "STARTTLS" in steps["ehlo"]["detail"]
    assert steps["tls"]["detail"].endswith("certificate verified for relay.test")
    assert steps["tls"]["detail"].startswith("TLSv1.")
    assert steps["auth"]["detail"] == "AUTH PLAIN accepted as relay"
    # Postfix names the SASL user only once MAIL starts; Dovecot answered its AUTH request.
    assert wait_for(lambda: postfix_smarthost.dovecot.auth_successes()) == ["relay"]
    assert postfix_smarthost.sink.messages == []
    assert "from=<" not in postfix_smarthost.postfix.log_text()  # no MAIL ever reached it


@pytest.mark.slow
def test_probe_text_report_names_each_step(
    postfix_smarthost: SmarthostLab, relay_dns: DnsServer, tmp_path: Path,
) -> None:
    config = write_config(tmp_path, relay_smarthost(postfix_smarthost), relay_dns.nameserver)

    done = run_probe(config)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "AUTH PLAIN accepted as relay" in done.stdout
    assert done.stdout.rstrip().endswith("probe passed")


@pytest.mark.slow
def test_probe_with_wrong_password_fails_at_auth_and_exits_1(
    postfix_smarthost: SmarthostLab, relay_dns: DnsServer, tmp_path: Path,
) -> None:
    smarthost = relay_smarthost(postfix_smarthost, password="Wrong-Smtp-Password-5")
    config = write_config(tmp_path, smarthost, relay_dns.nameserver)

    done = run_probe(config, "--json")

    assert done.returncode == 1, done.stdout + done.stderr
    steps = steps_of(done)
    assert json.loads(done.stdout)["ok"] is False
    assert steps["tls"]["ok"] is True
    assert steps["auth"]["ok"] is False
    assert "535" in steps["auth"]["detail"]
    assert "quit" not in steps
    # Postfix's disconnect summary: one AUTH attempted, none succeeded.
    assert wait_for(lambda: "auth=0/1" in postfix_smarthost.postfix.log_text())
    assert postfix_smarthost.dovecot.auth_successes() == []


@pytest.mark.slow
def test_probe_with_account_uses_that_accounts_login(
    postfix_smarthost: SmarthostLab, relay_dns: DnsServer, tmp_path: Path,
) -> None:
    lab = postfix_smarthost
    smarthost = relay_smarthost(lab, per_account_auth=True)
    accounts = [{"address": "alice@example.test",
                 "smarthost_auth": {"username": "alice", "password": lab.users["alice"]}}]
    config = write_config(tmp_path, smarthost, relay_dns.nameserver, accounts)

    done = run_probe(config, "--json", "--account", "alice@example.test")

    assert done.returncode == 0, done.stdout + done.stderr
    steps = steps_of(done)
    assert steps["credentials"]["detail"] == (
        "testing credentials of account alice@example.test (alice)")
    assert steps["auth"]["detail"] == "AUTH PLAIN accepted as alice"
    assert wait_for(lambda: lab.dovecot.auth_successes()) == ["alice"]


def test_probe_fails_when_required_tls_is_not_offered_and_never_sends_auth(
    smtp_sink: SinkFactory, dns_server_factory: Callable[[Sequence[str]], DnsServer],
    tmp_path: Path, ca_file: str,
) -> None:
    sink = smtp_sink("127.0.0.1", 0, hostname="relay.test", auth={"relay": "relay-Secret-1"},
                     auth_require_tls=False)  # no STARTTLS, AUTH offered in clear
    dns = dns_server_factory(["host-record=relay.test,127.0.0.1"])
    smarthost = {"host": "relay.test", "port": sink.port, "tls": "starttls", "ca_file": ca_file,
                 "auth": {"username": "relay", "password": "relay-Secret-1"}}
    config = write_config(tmp_path, smarthost, dns.nameserver)

    done = run_probe(config, "--json")

    assert done.returncode == 1, done.stdout + done.stderr
    steps = steps_of(done)
    assert steps["tls"]["ok"] is False
    assert "STARTTLS was not offered" in steps["tls"]["detail"]
    assert "auth" not in steps
    commands = [c for s in sink.sessions for c in s.commands]
    assert not any(c.startswith("AUTH") for c in commands), commands


def test_probe_of_unresolvable_smarthost_fails_at_resolve(
    dns_server_factory: Callable[[Sequence[str]], DnsServer], tmp_path: Path,
) -> None:
    dns = dns_server_factory([])
    config = write_config(tmp_path, {"host": "missing.test", "port": 2525}, dns.nameserver)

    done = run_probe(config, "--json")

    assert done.returncode == 1
    steps = steps_of(done)
    assert list(steps) == ["resolve"]
    assert "no such domain" in steps["resolve"]["detail"]


def test_probe_without_smarthost_is_a_config_error(tmp_path: Path) -> None:
    spec = {"version": 1, "host": {"name": "deliverd.test"},
            "queue": {"path": str(tmp_path / "queue")}}
    config, _ = write_rendered(normalise(spec), tmp_path / "etc")

    done = run_probe(config)

    assert done.returncode == 2
    assert "routing.smarthost is not configured" in done.stderr


@pytest.mark.slow
def test_probe_checks_every_host_of_a_list_and_every_route_in_one_table(
    postfix_smarthost: SmarthostLab, relay_dns: DnsServer, tmp_path: Path,
) -> None:
    lab = postfix_smarthost
    good = relay_smarthost(lab)
    listed = {k: v for k, v in good.items() if k not in ("host", "port")}
    listed["hosts"] = [{"host": "relay.test", "port": lab.port},
                       {"host": "relay.test", "port": free_port()}]  # nothing listens there
    spec = {
        "version": 1, "host": {"name": "deliverd.test"},
        "queue": {"path": str(tmp_path / "queue")},
        "routing": {"mode": "smarthost", "smarthost": listed},
        "routes": [{"name": "billing", "match": {"sender_domain": ["billing.test"]},
                    "smarthost": relay_smarthost(lab, "alice",
                                                 password="Wrong-Smtp-Password-5")}],
        "timeouts": {"connect": "3s", "greeting": "5s", "command": "5s", "dns": "2s"},
        "dns": {"nameservers": [relay_dns.nameserver]},
    }
    config, _ = write_rendered(normalise(spec), tmp_path / "etc")

    done = run_probe(config, "--json")

    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    hosts = [(h["route"], h["smarthost"], h["ok"]) for h in report["hosts"]]
    assert hosts == [(None, f"relay.test:{lab.port}", True),
                     (None, f"relay.test:{listed['hosts'][1]['port']}", False),
                     ("billing", f"relay.test:{lab.port}", False)]
    billing = {s["name"]: s for s in report["hosts"][2]["steps"]}
    assert billing["auth"]["ok"] is False and billing["tls"]["ok"] is True
    assert report["ok"] is False

    table = run_probe(config).stdout.splitlines()
    assert table[0].split() == ["route", "smart", "host", "resolve", "pop", "connect", "tls",
                                "auth"]
    assert table[1].split() == ["(default)", f"relay.test:{lab.port}", "ok", "-", "ok", "ok", "ok"]
    assert table[2].split()[2:5] == ["ok", "-", "FAIL"]
    assert table[3].split() == ["billing", f"relay.test:{lab.port}", "ok", "-", "ok", "ok", "FAIL"]

    only = run_probe(config, "--json", "--route", "billing")
    assert only.returncode == 1
    assert [h["route"] for h in json.loads(only.stdout)["hosts"]] == ["billing"]
    unknown = run_probe(config, "--route", "nosuch")
    assert unknown.returncode == 2 and "no route 'nosuch' (routes: billing)" in unknown.stderr
