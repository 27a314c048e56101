"""``ansible-test sanity`` passes for the mailops.deliverd collection.

ansible-test refuses a symlinked collection (the checkout's ``ansible_collections/mailops/
deliverd`` is one), so the collection is copied into a temporary ``ansible_collections`` tree.
Every sanity test builds its own venv and bootstraps pip with a ``get-pip`` script downloaded
from ci-files.testing.ansible.com; a script cached under ``~/.ansible/test/cache`` is used
instead when present. That host is not always reachable (offline labs, some CI), so a small
script that bootstraps pip from the standard library's ``ensurepip`` is put in that cache, under
a temporary HOME so nothing is written to the real one. The tests' own requirements still come
from the package index.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures import paths

REPO = paths.REPO
COLLECTION = REPO / "collection"
BIN = Path(sys.executable).parent
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.slow

# Every sanity test that applies to a collection runs; none is skipped. pslint and shellcheck
# need the pwsh and shellcheck binaries only when the collection has PowerShell or shell files:
# it has none, so they pass without them.
SKIPPED_TESTS: tuple[str, ...] = ()

# Stands in for get-pip: ensurepip installs the bundled pip, which then installs the pip version
# ansible-test asks for. ensurepip runs pip isolated from the environment's pip configuration;
# the real install must not be, or a configured package index would be ignored.
GET_PIP_SHIM = """\
import ensurepip, os, subprocess, sys
ensurepip.bootstrap(upgrade=True)
os.environ.pop("PIP_CONFIG_FILE", None)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", *args]).returncode)
"""

# Used only if ansible-test's pip version can be neither asked for nor read from its source.
PLAUSIBLE_PIP_VERSIONS = ("23.1.2", "24.0", "24.2", "24.3.1", "25.0.1", "25.1.1", "25.2")


def _requirements_source() -> str | None:
    spec = importlib.util.find_spec("ansible_test._internal.python_requirements")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).read_text(encoding="utf-8")


def pip_versions() -> tuple[str, ...]:
    """The pip version(s) ansible-test bootstraps its venvs with, for this Python."""
    try:
        from ansible_test._internal.python_requirements import (  # type: ignore[import-untyped]
            get_venv_packages,
        )

        # get_venv_packages reads only .version of its PythonConfig argument.
        return (str(get_venv_packages(SimpleNamespace(version=PYTHON))["pip"]),)
    except (ImportError, AttributeError, KeyError, TypeError):
        pass
    source = _requirements_source()
    found = re.search(r"""\bpip\s*=\s*['"]([0-9.]+)['"]""", source or "")
    return (found.group(1),) if found else PLAUSIBLE_PIP_VERSIONS


def write_get_pip_shims(home: Path) -> list[Path]:
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True)
    shims = [cache / f"get_pip_{version.replace('.', '_')}.py" for version in pip_versions()]
    for path in shims:
        path.write_text(GET_PIP_SHIM, encoding="utf-8")
    return shims


def copy_collection(root: Path) -> Path:
    """The collection copied to ``root/ansible_collections/mailops/deliverd`` (no symlink)."""
    dest = root / "ansible_collections" / "mailops" / "deliverd"
    dest.parent.mkdir(parents=True)
    shutil.copytree(COLLECTION, dest, symlinks=False, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "output", ".plugin-cache.yaml", "*.tar.gz"))
    return dest


def sanity_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ANSIBLE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


def test_get_pip_shim_is_written_for_the_pip_version_ansible_test_wants(tmp_path: Path) -> None:
    source = _requirements_source()
    if source is None:
        pytest.skip("ansible-test is not installed in the venv")
    paths = write_get_pip_shims(tmp_path)
    assert len(paths) == 1
    version = paths[0].stem.removeprefix("get_pip_").replace("_", ".")
    assert re.search(rf"""\bpip\s*=\s*['"]{re.escape(version)}['"]""", source)
    compile(paths[0].read_text(encoding="utf-8"), str(paths[0]), "exec")


def test_copied_collection_has_no_symlinks_and_every_plugin(tmp_path: Path) -> None:
    dest = copy_collection(tmp_path)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    for name in ("probe", "queue", "queue_info", "spec"):
        assert (dest / "plugins" / "modules" / f"{name}.py").is_file()
    assert (dest / "tests" / "sanity" / "ignore-2.19.txt").is_file()


# ansible-test runs each sanity test in its own venv: minutes on a busy machine, as long as the
# subprocess below is allowed rather than pytest's default.
@pytest.mark.timeout(1800)
def test_ansible_test_sanity_passes_for_the_collection(tmp_path: Path) -> None:
    ansible_test = BIN / "ansible-test"
    if not ansible_test.exists():
        pytest.skip("ansible-test is not installed in the venv")
    home = tmp_path / "home"
    write_get_pip_shims(home)
    dest = copy_collection(tmp_path / "tree")
    argv = [str(ansible_test), "sanity", "--local", "--python", PYTHON, "--color", "no"]
    for name in SKIPPED_TESTS:
        argv += ["--skip-test", name]
    proc = subprocess.run(argv, cwd=dest, env=sanity_env(home), capture_output=True, text=True,
                          timeout=1800, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert 'Running sanity test "validate-modules"' in out
