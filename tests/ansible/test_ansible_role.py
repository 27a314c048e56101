"""The deliverd role on this machine: the molecule scenario, and what a run may print."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fixtures import paths
from tests.fixtures.role import ansible_env, recap_changed, run_role, write_import_blocker

REPO = paths.REPO
BIN = Path(sys.executable).parent

# Each test runs the role several times, each first run building the engine's venv: past
# pyproject's 300 s hang guard on a busy machine (about 210 s each beside three other workers).
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

if not (BIN / "molecule").exists() or not (BIN / "ansible-playbook").exists():
    pytest.skip("molecule / ansible-playbook not installed in the venv", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the role creates a system user: run as root", allow_module_level=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def prefix() -> Iterator[Path]:
    # Directly under /tmp: molecule's destroy refuses any other prefix.
    path = Path(tempfile.mkdtemp(prefix="deliverd-role-test-", dir="/tmp"))
    path.chmod(0o755)  # the engine runs as the deliverd user and must reach its queue below
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_molecule_default_scenario_converges_idempotently_and_verifies(prefix: Path) -> None:
    shutil.rmtree(prefix)  # the scenario creates and destroys the prefix itself
    proc = subprocess.run(
        [str(BIN / "molecule"), "test", "-s", "default"], cwd=REPO, capture_output=True,
        text=True, timeout=1200, check=False,
        env=ansible_env(DELIVERD_MOLECULE_PREFIX=str(prefix),
                        DELIVERD_MOLECULE_PORT=str(_free_port())),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for step in ("converge", "idempotence", "check", "verify", "cleanup", "destroy"):
        assert re.search(rf"{step}\S*: Executed: Successful", re.sub(r"\x1b\[[0-9;]*m", "",
                                                                       output)), step
    assert not prefix.exists()


SMARTHOST_PASSWORD = "Role-Diff-Smarthost-Pw-41c7e"
POP_PASSWORD = "Role-Diff-Pop-Pw-0b2d9"
MAIL_PASSWORD = "Role-Diff-Mail-Pw-77aa1"
PASSWORDS = (SMARTHOST_PASSWORD, POP_PASSWORD, MAIL_PASSWORD)


def _spec(prefix: Path, port: int, suffix: str = "", delay: str = "1m") -> dict[str, object]:
    return {
        "version": 1,
        "host": {"name": "role-test.deliverd.test"},
        "listen": [{"address": "127.0.0.1", "port": port}],
        "queue": {"path": f"{prefix}/var/spool/deliverd"},
        "routing": {
            "mode": "direct",
            "smarthost": {
                "host": "relay.deliverd.test", "port": 587,
                "auth": {"username": "role", "password": SMARTHOST_PASSWORD + suffix},
                "pop_before_smtp": {"host": "pop.deliverd.test", "username": "role",
                                    "password": POP_PASSWORD + suffix},
            },
        },
        "accounts": [{"address": "app@role-test.deliverd.test",
                      "mail_password": MAIL_PASSWORD + suffix}],
        "retry": {"temp_error_delay": delay},
        "dns": {"nameservers": ["127.0.0.1:9"]},
    }


def _play(tmp: Path, prefix: Path, spec: dict[str, object], *options: str,
          state: str = "present", **extra: object) -> str:
    proc = run_role(tmp, {"deliverd_prefix": str(prefix), "deliverd_spec": spec,
                          "deliverd_state": state, "deliverd_purge_queue": True, **extra},
                    *options, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_verbose_diff_runs_never_print_a_password_and_check_mode_changes_nothing(
    tmp_path: Path, prefix: Path
) -> None:
    port = _free_port()
    etc = prefix / "etc" / "deliverd"
    outputs = []
    try:
        outputs.append(_play(tmp_path, prefix, _spec(prefix, port), "-v", "--diff"))
        # Changed passwords and settings: the diff of every file is shown, except the secrets.
        changed = _spec(prefix, port, suffix="-2", delay="2m")
        outputs.append(_play(tmp_path, prefix, changed, "-v", "--diff"))
        assert "temp_error_delay" in outputs[-1]  # the config diff is there
        config_before = _digest(etc / "deliverd.toml")
        secrets_before = _digest(etc / "secrets.toml")

        # A check-mode run after a spec change reports the change and changes nothing.
        later = _spec(prefix, port, suffix="-3", delay="3m")
        outputs.append(_play(tmp_path, prefix, later, "-v", "--check", "--diff"))
        assert recap_changed(outputs[-1]) > 0
        assert _digest(etc / "deliverd.toml") == config_before
        assert _digest(etc / "secrets.toml") == secrets_before

        # Idempotent: the same spec again changes nothing.
        assert recap_changed(_play(tmp_path, prefix, changed)) == 0
        assert (etc / "secrets.toml").stat().st_mode & 0o777 == 0o600
    finally:
        outputs.append(_play(tmp_path, prefix, _spec(prefix, port), "-v", "--diff",
                             state="absent"))
    for output in outputs:
        for password in PASSWORDS:
            assert password not in output
    assert not etc.exists()
    assert not (prefix / "var" / "spool" / "deliverd").exists()


def _rollback(tmp: Path, prefix: Path, spec: dict[str, object]) -> str:
    proc = run_role(tmp, {"deliverd_prefix": str(prefix), "deliverd_spec": spec},
                    tasks_from="rollback", timeout=600)
    return proc.stdout + proc.stderr + f"\nrc={proc.returncode}"


def test_the_role_keeps_the_previous_config_and_secrets_as_a_pair_and_rolls_back(
    tmp_path: Path, prefix: Path
) -> None:
    port = _free_port()
    etc = prefix / "etc" / "deliverd"
    config, secrets = etc / "deliverd.toml", etc / "secrets.toml"
    previous_config = etc / "deliverd.toml.previous"
    previous_secrets = etc / "secrets.toml.previous"
    first, second = _spec(prefix, port), _spec(prefix, port, suffix="-2", delay="2m")
    third = _spec(prefix, port, suffix="-2", delay="3m")  # the config changes, the secrets not
    try:
        _play(tmp_path, prefix, first)
        assert not previous_config.exists()  # one config so far: nothing to roll back to
        refused = _rollback(tmp_path, prefix, first)
        assert "rc=0" not in refused and "nothing to roll back to" in refused
        first_digests = (_digest(config), _digest(secrets))

        _play(tmp_path, prefix, second)
        assert (_digest(previous_config), _digest(previous_secrets)) == first_digests
        assert previous_secrets.stat().st_mode & 0o777 == 0o600
        assert not list(etc.glob("*~"))  # the template modules' own backups are gone
        second_digests = (_digest(config), _digest(secrets))

        _play(tmp_path, prefix, third)
        # The pair that ran before: the second config with the secrets it ran with.
        assert (_digest(previous_config), _digest(previous_secrets)) == second_digests
        assert recap_changed(_play(tmp_path, prefix, third)) == 0
        log = prefix / "var" / "log" / "deliverd" / "deliverd.log"
        reloads = log.read_text().count("reloaded: mode=")

        rolled = _rollback(tmp_path, prefix, third)
        assert "rc=0" in rolled, rolled[-3000:]
        assert (_digest(config), _digest(secrets)) == second_digests
        assert 'temp_error_delay = "2m"' in config.read_text()
        deadline = time.monotonic() + 15
        while log.read_text().count("reloaded: mode=") == reloads and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_text().count("reloaded: mode=") == reloads + 1  # the engine took it
        for password in PASSWORDS:
            assert password not in rolled
    finally:
        _play(tmp_path, prefix, first, state="absent")
    assert not etc.exists()


def test_wheelhouse_install_ships_every_wheel_the_controller_made_for_the_host(
    tmp_path: Path, prefix: Path
) -> None:
    port = _free_port()
    spec = _spec(prefix, port)
    try:
        _play(tmp_path, prefix, spec, deliverd_install_from="wheelhouse")
        shipped = prefix / "opt" / "deliverd" / "dist" / "wheels"
        names = {p.name.split("-")[0].lower() for p in shipped.glob("*.whl")}
        # The engine, its dependencies (compiled ones for this host's Python and architecture)
        # and the fast extra's uvloop: all that the --no-index install on the host needs.
        assert {"deliverd", "jsonschema", "rpds_py", "pyyaml", "dnspython", "aiosmtpd",
                "uvloop"} <= names, names
        venv = prefix / "opt" / "deliverd" / "venv"
        installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                                    "--format=json"], capture_output=True, text=True,
                                   check=True, timeout=120).stdout
        assert {p["name"].lower().replace("-", "_") for p in json.loads(installed)} >= {
            "deliverd", "jsonschema", "rpds_py", "uvloop"}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(64).startswith(b"220")
        assert recap_changed(_play(tmp_path, prefix, spec,
                                    deliverd_install_from="wheelhouse")) == 0
    finally:
        _play(tmp_path, prefix, spec, state="absent")


def test_a_controller_without_the_engine_is_told_why_the_spec_check_failed(
    tmp_path: Path, prefix: Path
) -> None:
    # The spec task runs under no_log (its result holds passwords): the reason it failed must
    # still reach the user, and nothing may change on the host.
    block = write_import_blocker(tmp_path / "block")
    (tmp_path / "vars.json").write_text(json.dumps({
        "deliverd_prefix": str(prefix), "deliverd_spec": _spec(prefix, _free_port()),
        "ansible_python_interpreter": sys.executable}), encoding="utf-8")
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "name": "Apply the role", "hosts": "localhost", "gather_facts": False,
        "roles": [{"role": "deliverd"}],
    }]), encoding="utf-8")
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"@{tmp_path / 'vars.json'}", str(tmp_path / "play.yml")],
        cwd=REPO, env=ansible_env(PYTHONPATH=str(block)), capture_output=True, text=True,
        timeout=600, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "needs the deliverd Python package on the controller" in output, output[-3000:]
    assert "import error: blocked for the test" in output
    assert not (prefix / "etc").exists()
    for password in PASSWORDS:
        assert password not in output
