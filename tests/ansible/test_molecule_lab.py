"""The multi-host molecule lab (molecule/lab) end to end, plus the namespace helpers' pure parts.

``molecule test -s lab`` builds three engine hosts in network namespaces reached by real SSH,
real DNS/Postfix/Dovecot/aiosmtpd servers in a service namespace, deploys per-host specs,
checks idempotence and check mode, verifies each host's route with real mail, rolls a smart
host change out (a rejected one first), rotates every host's DKIM key to a new selector while
mail flows (playbooks/rotate-dkim.yml: its preflight refusing a missing and a mismatched
record first; the sinks verify every message's signature against the lab's DNS), and tears
everything down.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deliverd_lab.common import LabError
from deliverd_lab.netns import (
    BRIDGE_ADDRESS,
    inventory_text,
    netns_available,
    plan,
    sshd_config_text,
)
from tests.fixtures import paths

REPO = paths.REPO
VENV_BIN = REPO / ".venv" / "bin"


def test_plan_numbers_hosts_from_eleven_on_the_lab_network(tmp_path: Path) -> None:
    layout = plan(tmp_path, 3, ["198.51.100.2"])
    assert [(h.name, h.address) for h in layout.hosts] == [
        ("dlv-h1", "198.51.100.11"), ("dlv-h2", "198.51.100.12"), ("dlv-h3", "198.51.100.13"),
    ]
    assert layout.namespaces == ("dlv-h1", "dlv-h2", "dlv-h3", "dlv-svc")
    assert all(len(h.outer_link) <= 15 for h in layout.hosts)


@pytest.mark.parametrize("address", ["203.0.113.5", BRIDGE_ADDRESS, "198.51.100.12"])
def test_plan_refuses_service_addresses_off_network_or_taken(
    tmp_path: Path, address: str
) -> None:
    with pytest.raises(LabError):
        plan(tmp_path, 3, [address])


def test_sshd_config_keeps_each_host_to_its_own_address_key_and_pid(tmp_path: Path) -> None:
    layout = plan(tmp_path, 2)
    first, second = (sshd_config_text(h, layout.authorized_keys) for h in layout.hosts)
    assert "ListenAddress 198.51.100.11:22" in first
    assert "ListenAddress 198.51.100.12:22" in second
    assert str(layout.hosts[0].pid_file) in first and str(layout.hosts[0].pid_file) not in second
    assert "PasswordAuthentication no" in first


def test_inventory_reaches_every_host_by_ssh_with_the_lab_key(tmp_path: Path) -> None:
    layout = plan(tmp_path, 3)
    hosts = json.loads(inventory_text(layout))["deliverd"]["hosts"]
    assert sorted(hosts) == ["dlv-h1", "dlv-h2", "dlv-h3"]
    for host in hosts.values():
        assert host["ansible_connection"] == "ssh"
        assert host["ansible_ssh_private_key_file"] == str(layout.private_key)
        assert f"UserKnownHostsFile={layout.known_hosts}" in host["ansible_ssh_common_args"]


def _lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the namespace lab needs root (ip netns, sshd, Postfix)"
    if not netns_available():
        return "`ip netns` is not available here (no iproute2 or no permission)"
    for binary in ("sshd", "postfix", "dovecot", "dnsmasq", "swaks"):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            return f"{binary} is not installed"
    if not (VENV_BIN / "molecule").exists():
        return "molecule is not installed in the repo's .venv"
    return None


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.integration
@pytest.mark.timeout(2200)
def test_molecule_lab_deploys_verifies_routes_changes_smarthost_and_rotates_dkim() -> None:
    reason = _lab_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    env["PY_COLORS"] = "0"
    done = subprocess.run(
        [str(VENV_BIN / "molecule"), "test", "-s", "lab"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=2100, check=False, preexec_fn=_ahead,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, _failures(output) + output[-8000:]


def _ahead() -> None:
    """The suite's longest test, started first: in a parallel run its processes (and the lab
    hosts it starts) get the CPU before the other workers' short tests, so the run does not end
    waiting for it alone. Only root may raise a priority; anyone else runs it as it is."""
    with contextlib.suppress(OSError):
        os.nice(-10)


def _failures(output: str) -> str:
    """Every failed task of the run with the lines that name it: a failure early in a long
    run is otherwise cut off with the head of the output."""
    lines = output.splitlines()
    shown: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(("fatal: ", "failed: ")) or "FAILED!" in line:
            shown += [*lines[max(0, i - 3):i + 1], "..."]
    return "\n".join(shown)[-8000:] + "\n--- the run's last lines ---\n"


def _labcheck() -> Any:
    spec = importlib.util.spec_from_file_location(
        "labcheck", REPO / "molecule" / "lab" / "files" / "labcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sent_and_received(tmp_path: Path, received: list[dict[str, Any]],
                       refused: int = 0) -> tuple[Path, Path]:
    """A sender's log (every received message accepted, plus ``refused`` refusals) and a sink
    that recorded ``received``."""
    sinks = tmp_path / "sinks"
    (sinks / "mx").mkdir(parents=True)
    (sinks / "mx" / "messages.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in received))
    log = tmp_path / "sent-dlv-h1.jsonl"
    entries = [{"message_id": r["message_id"], "accepted": True} for r in received]
    entries += [{"message_id": f"<refused-{i}@lab.test>", "accepted": False}
                for i in range(refused)]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return sinks, log


def _signed(number: int, selector: str, ok: bool = True) -> dict[str, Any]:
    return {"message_id": f"<m{number}@lab.test>",
            "dkim": [{"d": "dlv-h1.lab.test", "s": selector, "a": "rsa-sha256", "ok": ok}]}


def test_dkim_check_counts_selectors_of_accepted_mail_and_ignores_refused(
        tmp_path: Path) -> None:
    sinks, log = _sent_and_received(tmp_path, [_signed(1, "s1"), _signed(2, "s1"),
                                               _signed(3, "s2")], refused=2)
    summary = _labcheck().dkim_signed(sinks, [log], ["s1", "s2"], 0.0)
    assert summary == {"sent-dlv-h1.jsonl": {"accepted": 3, "selectors": {"s1": 2, "s2": 1}}}


@pytest.mark.parametrize(("received", "selectors", "reason"), [
    ([_signed(1, "s1"), {"message_id": "<m2@lab.test>", "dkim": []}], ["s1"],
     "<m2@lab.test> arrived unsigned"),
    ([_signed(1, "s1"), _signed(2, "s2", ok=False)], ["s1"], "does not verify"),
    ([_signed(1, "s1"), {"message_id": "<m2@lab.test>"}], ["s1"], "did not check DKIM"),
    ([_signed(1, "s1")], ["s1", "s2"], "no message signed with ['s2']"),
])
def test_dkim_check_fails_on_unsigned_failing_unchecked_or_a_missing_selector(
        tmp_path: Path, received: list[dict[str, Any]], selectors: list[str],
        reason: str) -> None:
    labcheck = _labcheck()
    sinks, log = _sent_and_received(tmp_path, received)
    with pytest.raises(labcheck.CheckFailed) as failed:
        labcheck.dkim_signed(sinks, [log], selectors, 0.0)
    assert reason in str(failed.value)


def test_dkim_check_fails_when_an_accepted_message_never_arrives(tmp_path: Path) -> None:
    labcheck = _labcheck()
    sinks, log = _sent_and_received(tmp_path, [_signed(1, "s1")])
    with log.open("a") as more:
        more.write(json.dumps({"message_id": "<lost@lab.test>", "accepted": True}) + "\n")
    with pytest.raises(labcheck.CheckFailed, match="1 of 2 accepted messages never reached"):
        labcheck.dkim_signed(sinks, [log], ["s1"], 0.0)


POP_LOGIN = ("{t} pop3-login: Info: Login: user=<h3pop>, method=PLAIN, rip=10.0.0.3,"
             " lip=10.0.0.2, mpid=1, TLS, session=<x>")
SASL_OK = "{t} auth: Debug: client passdb out: OK\t1\tuser=h3\t"


@pytest.mark.parametrize(("lines", "failure"), [
    # Two sessions that started together share one login (the engine's lock), then a later
    # session logs in again: all proven.
    ([POP_LOGIN.format(t="2026-12-01 01:00:00"), SASL_OK.format(t="2026-12-01 01:00:01"),
      SASL_OK.format(t="2026-12-01 01:00:01"), POP_LOGIN.format(t="2026-12-01 01:00:30"),
      SASL_OK.format(t="2026-12-01 01:00:31")], None),
    ([SASL_OK.format(t="2026-12-01 01:00:01")], "without a POP3 login"),
    ([POP_LOGIN.format(t="2026-12-01 01:00:00"), SASL_OK.format(t="2026-12-01 01:00:30")],
     "30s after the last POP3 login"),
    ([POP_LOGIN.format(t="2026-12-01 01:00:00")], "no SMTP AUTH"),
])
def test_pop_before_sasl_wants_a_recent_pop_login_before_every_auth(
    tmp_path: Path, lines: list[str], failure: str | None,
) -> None:
    labcheck = _labcheck()
    log = tmp_path / "dovecot.log"
    log.write_text("\n".join(lines) + "\n")
    if failure is None:
        assert labcheck.pop_before_sasl(log, "h3pop", "h3") == {
            "pop_logins": 2, "smtp_auths": 3}
    else:
        with pytest.raises(labcheck.CheckFailed, match=failure):
            labcheck.pop_before_sasl(log, "h3pop", "h3")
