"""The mailops.deliverd collection from a checkout: docs, the spec action plugin, lint."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures import paths
from tests.fixtures.role import ansible_env, write_import_blocker

REPO = paths.REPO
BIN = Path(sys.executable).parent
PASSWORD = "Spec-Test-Secret-5e1c9"

pytestmark = pytest.mark.slow

NEEDED_ENGINE_MODULES = ("deliverd.spec.validation",)


def _missing_engine_modules() -> list[str]:
    return [m for m in NEEDED_ENGINE_MODULES if importlib.util.find_spec(m) is None]


requires_engine = pytest.mark.skipif(
    bool(_missing_engine_modules()),
    reason=f"deliverd engine modules not there yet: {_missing_engine_modules()}",
)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in the venv")
    return str(path)


def _run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=ansible_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _run_spec_action(tmp_path: Path, spec: object) -> tuple[subprocess.CompletedProcess[str],
                                                             dict[str, object]]:
    """Run mailops.deliverd.spec on localhost; its registered result is written to a file."""
    out = tmp_path / "result.json"
    playbook = [{
        "name": "Validate a spec",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [
            {"name": "Validate", "mailops.deliverd.spec": {"spec": spec},
             "register": "checked", "ignore_errors": True},
            {"name": "Save the result", "ansible.builtin.copy": {
                "content": "{{ checked | to_json }}", "dest": str(out), "mode": "0600"}},
        ],
    }]
    pb = tmp_path / "validate.yml"
    pb.write_text(yaml.safe_dump(playbook), encoding="utf-8")
    proc = _run([_tool("ansible-playbook"), "-i", "localhost,", "-c", "local",
                 "-e", f"ansible_python_interpreter={sys.executable}", str(pb)])
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["spec", "probe", "queue_info", "queue"])
def test_ansible_doc_documents_each_plugin_with_check_mode_attributes(name: str) -> None:
    proc = _run([_tool("ansible-doc"), "--json", f"mailops.deliverd.{name}"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)[f"mailops.deliverd.{name}"]
    assert doc["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert "diff_mode" in doc["doc"]["attributes"]
    assert doc["examples"].strip()
    assert doc["return"]


@requires_engine
def test_spec_action_returns_the_normalised_spec(tmp_path: Path) -> None:
    proc, result = _run_spec_action(tmp_path, {"version": 1, "host": {"name": "a.example"}})
    assert not result.get("failed"), proc.stdout
    spec = result["spec"]
    assert isinstance(spec, dict)
    # Schema defaults are filled in by the engine's normaliser.
    assert spec["routing"]["mode"] == "direct"
    assert spec["listen"] == [{"address": "127.0.0.1", "port": 2525, "allow_networks": []}]
    assert result["changed"] is False


@requires_engine
def test_spec_action_lists_every_problem_pointer_of_a_bad_spec(tmp_path: Path) -> None:
    from deliverd.spec.validation import validate_spec

    bad = {
        "version": 1,
        "host": {"name": "a.example"},
        "listen": [{"address": "127.0.0.1", "port": 70000}],
        "routing": {"mode": "sideways",
                    "smarthost": {"host": "relay.example",
                                  "auth": {"username": "u", "password": PASSWORD}}},
        "retry": {"interval": "soon"},
        "bogus": True,
    }
    expected = [p.pointer for p in validate_spec(bad) if p.severity.value == "error"]
    assert len(expected) >= 4
    proc, result = _run_spec_action(tmp_path, bad)
    assert result["failed"] is True
    msg = str(result["msg"])
    for pointer in ("/listen/0/port", "/routing/mode", "/retry/interval", *expected):
        assert pointer in msg, f"{pointer} missing from: {msg}"
    pointers = {p["pointer"] for p in result["problems"]}  # type: ignore[union-attr]
    assert set(expected) <= pointers
    assert PASSWORD not in proc.stdout + proc.stderr


@requires_engine
def test_spec_action_masks_a_password_quoted_by_a_validator_message(tmp_path: Path) -> None:
    # A password of the wrong type gets quoted by jsonschema-style messages; it must not leak.
    bad = {"version": 1, "host": {"name": "a.example"},
           "routing": {"mode": "smarthost",
                       "smarthost": {"host": "relay.example",
                                     "auth": {"username": PASSWORD, "password": PASSWORD * 300}}}}
    proc, result = _run_spec_action(tmp_path, bad)
    assert result["failed"] is True
    assert PASSWORD not in json.dumps(result)
    assert PASSWORD not in proc.stdout + proc.stderr


def test_spec_action_explains_how_to_install_deliverd_when_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A controller Python without deliverd: the venv has it installed, so a sitecustomize on
    # PYTHONPATH blocks its import in ansible-playbook.
    block = write_import_blocker(tmp_path / "block")
    monkeypatch.setenv("PYTHONPATH", f"{block}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    _proc, result = _run_spec_action(tmp_path, {"version": 1, "host": {"name": "a.example"}})
    assert result["failed"] is True
    assert "install" in str(result["msg"]) and "controller" in str(result["msg"])


def test_spec_action_names_only_the_declared_requirements_the_controller_lacks(
    tmp_path: Path,
) -> None:
    # What the action reads from the collection's requirements.txt when deliverd is not
    # importable: every requirement for this Python (comments skipped, markers applied), of
    # which it names those this Python does not satisfy, with the command that installs them.
    from ansible_collections.mailops.deliverd.plugins.action import spec as action

    wanted = action.declared_requirements(
        "# the validator's\njinja2>=3.1  # with ansible-core\n\njsonschema>=4.20\n"
        "PyYAML>=999\nuvloop>=0.19; python_version < '3'\n")
    assert [r.name for r in wanted] == ["jinja2", "jsonschema", "PyYAML"]
    # This venv has Jinja2 and jsonschema new enough, and no PyYAML 999.
    missing = action.unmet(wanted)
    assert [str(r) for r in missing] == ["PyYAML>=999"]
    msg = action.missing_message(missing, tmp_path / "requirements.txt")
    assert "needs PyYAML>=999 in the Python that runs ansible-playbook" in msg
    assert f"'{sys.executable} -m pip install -r {tmp_path}/requirements.txt'" in msg
    # The collection's own file declares what the validator imports, at pyproject's bounds.
    declared = {r.name: str(r.specifier) for r in action.declared_requirements(
        (REPO / "collection" / "requirements.txt").read_text(encoding="utf-8"))}
    assert declared == {"jsonschema": ">=4.20"}
    assert "jsonschema>=4.20" in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_queue_module_decides_changes_from_the_listing() -> None:
    from ansible_collections.mailops.deliverd.plugins.module_utils import deliverd_queue as dq

    now = 1_000_000.0
    waiting = {"address": "a@x.test", "state": "deferred", "next_attempt": now + 60}
    due = {"address": "b@x.test", "state": "deferred", "next_attempt": now - 1}
    sent = {"address": "c@x.test", "state": "sent", "next_attempt": now + 60}
    held = {"queue_id": "A", "held": True, "recipients": [waiting]}
    free = {"queue_id": "B", "held": False, "recipients": [waiting]}
    idle = {"queue_id": "C", "held": False, "recipients": [due, sent]}
    table = [
        ("flushed", None, [], False),
        ("flushed", None, [free], True),
        # flush makes due only deferred recipients still waiting, of messages not held
        ("flushed", None, [held], False),
        ("flushed", None, [idle], False),
        ("held", free, [free], True),
        ("held", held, [held], False),
        ("held", None, [], False),
        ("released", held, [held], True),
        ("released", free, [free], False),
        ("released", None, [], False),
        ("absent", free, [free], True),
        ("absent", None, [], False),
    ]
    for state, entry, entries, expected in table:
        assert dq.would_change(state, entry, entries, now) is expected, (state, entry, entries)
    assert dq.entries_of([free]) == [free]
    assert dq.entries_of({"messages": [held]}) == [held]
    assert dq.listing([held, free]) == {"entries": [held, free], "count": 2, "ids": ["A", "B"]}
    assert dq.find_entry([held, free], "B") is free
    assert set(dq.STATE_ACTIONS) == {"flushed", "held", "released", "absent"}


def test_queue_module_rejects_json_that_is_not_a_queue_listing() -> None:
    from ansible_collections.mailops.deliverd.plugins.module_utils import deliverd_queue as dq

    with pytest.raises(dq.DeliverdCliError, match="unexpected JSON"):
        dq.entries_of({"flushed": 3})
    with pytest.raises(dq.DeliverdCliError, match="unexpected JSON"):
        dq.entries_of("Mail queue is empty")


def _queue_with_one_message(tmp_path: Path) -> tuple[Path, str]:
    """A rendered engine config whose queue holds one message; (config, queue id)."""
    deliverd = _tool("deliverd")
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump({"version": 1, "host": {"name": "a.example"},
                                    "queue": {"path": str(tmp_path / "spool")}}),
                    encoding="utf-8")
    rendered = _run([deliverd, "render", str(spec), "-o", str(tmp_path / "etc")])
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    config = tmp_path / "etc" / "deliverd.toml"
    sent = _run([deliverd, "send", "-c", str(config), "--from", "app@a.example",
                 "--to", "someone@b.example", "--json"])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return config, str(json.loads(sent.stdout)["queue_id"])


def test_queue_modules_hold_release_and_delete_a_real_queued_message(tmp_path: Path) -> None:
    config, queue_id = _queue_with_one_message(tmp_path)
    where = {"executable": _tool("deliverd"), "config": str(config)}
    steps: list[tuple[str, str, dict[str, object], bool]] = [
        # (registered name, module, arguments, check mode)
        ("listed", "queue_info", {}, False),
        ("hold_checked", "queue", {"state": "held", "id": queue_id}, True),
        ("after_check", "queue_info", {}, False),
        ("held", "queue", {"state": "held", "id": queue_id}, False),
        ("held_again", "queue", {"state": "held", "id": queue_id}, False),
        ("after_hold", "queue_info", {}, False),
        ("released", "queue", {"state": "released", "id": queue_id}, False),
        # Never attempted, so nothing is deferred: a flush has nothing to make due.
        ("flushed", "queue", {"state": "flushed"}, False),
        ("deleted", "queue", {"state": "absent", "id": queue_id}, False),
        ("deleted_again", "queue", {"state": "absent", "id": queue_id}, False),
        ("after_delete", "queue_info", {}, False),
    ]
    out = tmp_path / "results.json"
    tasks: list[dict[str, object]] = [
        {"name": name, f"mailops.deliverd.{module}": {**where, **args},
         "check_mode": check, "register": name}
        for name, module, args, check in steps
    ]
    saved = "{{ {" + ", ".join(f"'{n}': {n}" for n, *_ in steps) + "} | to_json }}"
    tasks.append({"name": "Save the results", "ansible.builtin.copy": {
        "content": saved, "dest": str(out), "mode": "0600"}})
    pb = tmp_path / "queue.yml"
    pb.write_text(yaml.safe_dump([{"name": "Operate the queue", "hosts": "localhost",
                                   "gather_facts": False, "tasks": tasks}]), encoding="utf-8")
    proc = _run([_tool("ansible-playbook"), "-i", "localhost,", "-c", "local",
                 "-e", f"ansible_python_interpreter={sys.executable}", str(pb)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text(encoding="utf-8"))

    assert r["listed"]["ids"] == [queue_id] and r["listed"]["changed"] is False
    assert r["hold_checked"]["changed"] is True
    assert r["after_check"]["entries"][0]["held"] is False
    assert (r["held"]["changed"], r["held_again"]["changed"]) == (True, False)
    assert r["after_hold"]["entries"][0]["held"] is True
    assert r["released"]["changed"] is True
    assert r["flushed"]["changed"] is False
    assert (r["deleted"]["changed"], r["deleted_again"]["changed"]) == (True, False)
    assert queue_id in r["deleted_again"]["msg"]
    assert r["after_delete"]["count"] == 0


def test_queue_module_requires_an_id_for_a_message_state(tmp_path: Path) -> None:
    config, _queue_id = _queue_with_one_message(tmp_path)
    proc = _run([_tool("ansible"), "localhost", "-i", "localhost,", "-c", "local",
                 "-e", f"ansible_python_interpreter={sys.executable}",
                 "-m", "mailops.deliverd.queue",
                 "-a", f"state=held executable={_tool('deliverd')} config={config}"])
    assert proc.returncode != 0
    assert "state is held but all of the following are missing: id" in proc.stdout


def test_probe_module_reports_every_failed_step() -> None:
    from ansible_collections.mailops.deliverd.plugins.modules import probe

    ok, _steps, msg = probe.summarise({"ok": False, "steps": [
        {"name": "connect", "ok": True, "detail": "220 hi"},
        {"name": "starttls", "ok": False, "detail": "certificate verify failed"},
        {"name": "auth", "ok": False, "detail": "535 5.7.8 rejected"},
    ]})
    assert ok is False
    assert "starttls: certificate verify failed" in msg and "auth: 535 5.7.8 rejected" in msg
    assert probe.summarise({"ok": True, "steps": [{"name": "connect", "ok": True}]})[0] is True


def test_ansible_lint_passes_with_the_production_profile() -> None:
    if shutil.which("git") is None:
        pytest.skip("ansible-lint needs git")
    proc = _run([_tool("ansible-lint"), "--offline"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
