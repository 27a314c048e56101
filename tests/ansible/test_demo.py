"""The README's demo command keeps working: it shows one message sent, one deferred, one bounced
and the bounce that came back; as root it deploys the two-host demo fleet with the role and shows
a message delivered through each host, by its own route."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures import paths

REPO = paths.REPO


@pytest.mark.integration
@pytest.mark.slow
def test_demo_shows_delivered_deferred_and_bounced_mail_and_deploys_the_fleet() -> None:
    result = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py")],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "to=<bob@example.net>" in out and "status=sent" in out
    assert "to=<carol@busy.example>" in out and "status=deferred" in out
    assert "to=<dave@gone.example>" in out and "status=bounced" in out
    assert "Status: 5.1.1" in out and "Action: failed" in out
    for example in ("direct.yml", "smarthost.yml", "fallback.yml"):
        assert example in out
    if os.geteuid() == 0:
        assert "to=<relay-a@example.net>" in out and "route=direct" in out
        assert "to=<relay-b@example.net>" in out and "route=smarthost" in out
        assert "the smart host sink received: [('relay-b@example.net',)]" in out
        assert out.count("failed=0") == 4  # deploy and removal, two hosts each


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deliverd_demo", REPO / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_a_failed_deploy_shows_the_failed_task_and_keeps_the_log_after_the_demo_cleaned_up(
        ) -> None:
    demo = _demo_module()
    inventory = {"deliverd": {"hosts": {"relay-x": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "deliverd_spec": {"version": 1, "routing": {"mode": "no-such-mode"}}}}}}
    with tempfile.TemporaryDirectory(prefix="deliverd-demo-test-") as tmp, \
            pytest.raises(SystemExit) as failed:
        workdir = Path(tmp)
        (workdir / "fleet.json").write_text(json.dumps(inventory))
        demo.ansible(workdir, workdir / "fleet.json")
    message = str(failed.value.code)
    assert "fatal: [relay-x]" in message, message
    kept = Path(message.rsplit(" is in ", 1)[1].strip())
    try:
        assert not Path(tmp).exists()  # the demo's work directory is gone ...
        assert "PLAY RECAP" in kept.read_text()  # ... the log it names is not
    finally:
        kept.unlink(missing_ok=True)


def test_failed_tasks_lists_each_failed_task_with_its_failures() -> None:
    output = ("TASK [deliverd : Validate the spec] ****\nok: [a]\nfatal: [b]: FAILED! => {}\n"
              "TASK [deliverd : Install] ****\nfailed: [a] (item=x) => {}\n"
              "failed: [a] (item=y) => {}\nPLAY RECAP ****\n")
    assert _demo_module().failed_tasks(output) == [
        "TASK [deliverd : Validate the spec]", "  fatal: [b]: FAILED! => {}",
        "TASK [deliverd : Install]", "  failed: [a] (item=x) => {}",
        "  failed: [a] (item=y) => {}"]
