"""The role runs the engine under systemd only where systemd is running.

Both cases use the same Debian 12 root with Debian's systemd package installed, so ``/sbin/init``
links to systemd in both and Ansible's ``service_mgr`` fact says ``systemd`` in both: booted with
systemd-nspawn (systemd is PID 1) the role picks systemd; entered without booting (a shell is
PID 1, as in most containers) it picks the supervised process. ``deliverd_service_manager``
overrides the choice either way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.sdbox import SdBox, booted, playbook_argv, run_unbooted

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

if os.geteuid() != 0:
    pytest.skip("systemd-nspawn containers need root", allow_module_level=True)

# The role's own decision, then what the service_mgr fact says on the same host.
DECIDE = [
    {"name": "Decide", "ansible.builtin.include_role": {"name": "deliverd",
                                                         "tasks_from": "service_manager"}},
    {"name": "Gather service_mgr", "ansible.builtin.setup": {
        "gather_subset": ["!all", "service_mgr"]}},
    {"name": "Show", "ansible.builtin.debug": {
        "msg": "choice={{ __deliverd_service_manager }} "
               "service_mgr={{ ansible_facts['service_mgr'] }}"}},
]
SHOWN = re.compile(r"choice=(\w+) service_mgr=(\w+)")


def _decided(output: str, returncode: int) -> tuple[str, str]:
    found = SHOWN.search(output)
    assert returncode == 0 and found is not None, output[-6000:]
    return found.group(1), found.group(2)


def _unbooted(tmp_path: Path, variables: dict[str, object]) -> tuple[str, str]:
    work = tmp_path / "work"
    work.mkdir()
    argv = playbook_argv(work, {"ansible_python_interpreter": "/usr/bin/python3", **variables},
                         tasks=DECIDE)
    done = run_unbooted(argv, work)
    return _decided(done.stdout + done.stderr, done.returncode)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdBox]:
    work = tmp_path_factory.mktemp("choice-work")
    no_wheels = tmp_path_factory.mktemp("no-wheels")  # the decision installs nothing
    with booted(f"deliverd-choice-{os.getpid()}", no_wheels, work) as sdbox:
        yield sdbox


def _booted(box: SdBox, variables: dict[str, object]) -> tuple[str, str]:
    done = box.play({"ansible_python_interpreter": "/usr/bin/python3", **variables},
                    tasks=DECIDE)
    return _decided(done.stdout + done.stderr, done.returncode)


def test_systemd_installed_but_not_pid1_gets_the_supervised_process(tmp_path: Path) -> None:
    # The trap: the fact follows /sbin/init, which the systemd package links to systemd.
    assert _unbooted(tmp_path, {}) == ("supervised", "systemd")


def test_forcing_systemd_where_it_is_not_running_is_obeyed(tmp_path: Path) -> None:
    assert _unbooted(tmp_path, {"deliverd_service_manager": "systemd"})[0] == "systemd"


def test_systemd_as_pid1_gets_the_systemd_unit(box: SdBox) -> None:
    assert _booted(box, {}) == ("systemd", "systemd")


def test_forcing_supervised_under_a_running_systemd_is_obeyed(box: SdBox) -> None:
    assert _booted(box, {"deliverd_service_manager": "supervised"})[0] == "supervised"
