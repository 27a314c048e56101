"""The suite's parallel run keeps its promises: files that share a machine-wide lab resource
are one group, the slowest groups are handed out first, and the installed pytest and
pytest-xdist really run one group on one worker (with pytest 9.2 they silently did not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import conftest


def test_files_sharing_a_lab_resource_are_one_group_and_others_their_own() -> None:
    assert conftest._group_of("lab/test_dane_delivery.py") == "dnssec-lab"
    assert conftest._group_of("lab/test_resolver_dnssec.py") == "dnssec-lab"
    assert conftest._group_of("ansible/test_dkim_role.py") == "localhost-role"
    assert conftest._group_of("unit/delivery/test_router.py") == "unit/delivery/test_router.py"


def test_every_file_named_for_grouping_or_timing_exists() -> None:
    named = [*conftest.SLOW_FILES]
    for files in conftest.SHARED_GROUPS.values():
        named.extend(files)
    missing = [name for name in named if not (conftest.TESTS / name).is_file()]
    assert not missing, f"tests/conftest.py names files that are not there: {missing}"


def test_the_slowest_groups_come_first() -> None:
    weights = {group: conftest._weight(group)
               for group in ("ansible/test_molecule_lab.py", "localhost-role",
                             "unit/delivery/test_router.py")}
    assert weights["ansible/test_molecule_lab.py"] > weights["localhost-role"]
    assert weights["localhost-role"] > weights["unit/delivery/test_router.py"]


TEST_FILE = """
import json, os, pytest
pytestmark = pytest.mark.xdist_group({group!r})

@pytest.mark.parametrize("n", range(4))
def test_records_its_worker(n):
    with open({out!r}, "a") as f:
        f.write(json.dumps([__name__, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")
"""


def test_installed_xdist_runs_one_group_on_one_worker(tmp_path: Path) -> None:
    out = tmp_path / "workers.jsonl"
    for name, group in (("test_a", "shared"), ("test_b", "shared"), ("test_c", "other")):
        (tmp_path / f"{name}.py").write_text(TEST_FILE.format(group=group, out=str(out)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--dist", "loadgroup", "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(seen) == 12
    shared = {worker for module, worker in seen if module in ("test_a", "test_b")}
    assert len(shared) == 1, f"one group ran on several workers: {seen}"
