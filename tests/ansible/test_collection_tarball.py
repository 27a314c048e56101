"""The collection as Galaxy would serve it: ``make collection`` builds a tarball that carries the
engine's wheel; installed into an empty collections path and run from a controller venv that
holds only ansible-core (tests/fixtures/controller.py), its spec action validates with that
wheel and its role deploys a host from it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.fixtures import paths
from tests.fixtures.controller import controller_venv

REPO = paths.REPO
BIN = Path(sys.executable).parent
# The host side of the plays is this machine, with its own Python (not the controller's venv).
HOST_PYTHON = "/usr/bin/python3"

pytestmark = [pytest.mark.slow, pytest.mark.integration]

if not (BIN / "ansible-galaxy").exists():
    pytest.skip("ansible-galaxy is not installed in the venv", allow_module_level=True)


@pytest.fixture(scope="module")
def controller() -> Path:
    """The bin/ of a venv with only ansible-core: no deliverd, no jsonschema."""
    venv = controller_venv()
    for name in ("deliverd", "jsonschema"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {name}"],
                               capture_output=True, timeout=60, check=False)
        assert probe.returncode != 0, f"the bare controller venv has {name}"
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, controller: Path) -> Path:
    """The tarball from make collection, installed into an empty collections path by the bare
    controller's ansible-galaxy."""
    subprocess.run(["make", "-o", f"{BIN.parent}/.installed", "collection", f"VENV={BIN.parent}"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    (tarball,) = (REPO / "dist").glob("mailops-deliverd-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert any(n.startswith("wheels/deliverd-") and n.endswith(".whl") for n in names), names
    root = tmp_path_factory.mktemp("collections")
    config = tmp_path_factory.mktemp("config") / "ansible.cfg"
    config.write_text("[defaults]\n", encoding="utf-8")
    # Away from the checkout's ansible.cfg, whose collections path already has mailops.deliverd.
    subprocess.run([str(controller / "ansible-galaxy"), "collection", "install", "--offline",
                    "-p", str(root), str(tarball)], cwd=root, check=True, capture_output=True,
                   timeout=300, env={**_controller_env(controller), "ANSIBLE_CONFIG": str(config)})
    assert (root / "ansible_collections" / "mailops" / "deliverd" / "wheels").is_dir()
    return root


def _controller_env(controller: Path) -> dict[str, str]:
    """This process's environment without the checkout's venv in it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("ANSIBLE_")}
    env["PATH"] = os.pathsep.join([str(controller), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return env


def _playbook(tmp: Path, controller: Path, collections: Path, tasks: list[dict[str, object]],
              *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp / "ansible.cfg").write_text("[defaults]\n", encoding="utf-8")
    (tmp / "play.yml").write_text(yaml.safe_dump([{
        "name": "Use the installed collection", "hosts": "localhost", "gather_facts": False,
        "tasks": tasks}]), encoding="utf-8")
    full_env = {**_controller_env(controller), "ANSIBLE_CONFIG": str(tmp / "ansible.cfg"),
                "ANSIBLE_COLLECTIONS_PATH": str(collections),
                "XDG_CACHE_HOME": str(tmp / "cache"), "ANSIBLE_NOCOLOR": "1", **(env or {})}
    return subprocess.run(
        [str(controller / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={HOST_PYTHON}", *extra, str(tmp / "play.yml")],
        cwd=tmp, env=full_env, capture_output=True, text=True, timeout=900, check=False)


def test_spec_action_validates_with_the_bundled_wheel(controller: Path, installed: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = _playbook(tmp_path, controller, installed, [
        {"name": "Validate", "mailops.deliverd.spec": {"spec": {
            "version": 1, "host": {"name": "a.example"},
            "routing": {"mode": "smarthost", "smarthost": {"host": "relay.example"}}}},
         "register": "checked"},
        {"name": "Validate a bad spec", "mailops.deliverd.spec": {"spec": {"version": 1}},
         "register": "bad", "ignore_errors": True},
        {"name": "Save", "ansible.builtin.copy": {
            "content": "{{ [checked, bad] | to_json }}", "dest": str(out), "mode": "0600"}},
    ])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    checked, bad = json.loads(out.read_text(encoding="utf-8"))
    assert checked["spec"]["routing"]["smarthost"]["port"] == 25  # defaults applied
    assert bad["failed"] and any(p["pointer"] == "/host" for p in bad["problems"])
    # The wheel unpacked once, and the validator's dependencies the controller lacked
    # installed beside it, not into the controller's own venv.
    cache = tmp_path / "cache" / "mailops.deliverd"
    (wheel_dir,) = [p for p in cache.iterdir() if p.is_dir() and "-deps-" not in p.name]
    assert wheel_dir.name.startswith("deliverd-")
    (deps,) = cache.glob(f"{wheel_dir.name}-deps-*[!k]")
    assert (deps / "jsonschema" / "__init__.py").is_file()
    still_bare = subprocess.run([str(controller / "python"), "-c", "import jsonschema"],
                                capture_output=True, timeout=60, check=False)
    assert still_bare.returncode != 0


def test_spec_action_on_a_controller_without_an_index_says_what_it_could_not_install(
        controller: Path, installed: Path, tmp_path: Path) -> None:
    proc = _playbook(tmp_path, controller, installed, [
        {"name": "Validate", "mailops.deliverd.spec": {"spec": {
            "version": 1, "host": {"name": "a.example"}}}},
    ], env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    assert proc.returncode != 0
    assert "installing jsonschema>=" in proc.stdout, proc.stdout[-4000:]
    assert "No matching distribution found for jsonschema" in proc.stdout, proc.stdout[-4000:]
    assert not list((tmp_path / "cache" / "mailops.deliverd").glob("*-deps-*[!k]"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the role creates a system user: run as root")
def test_role_from_the_installed_collection_deploys_a_host_offline(
        controller: Path, installed: Path, tmp_path: Path) -> None:
    """deliverd_install_from: wheelhouse on the bare controller: its pip downloads the host's
    wheels around the collection's engine wheel, and the host installs with --no-index."""
    # Directly under /tmp: the engine runs as the deliverd user and must reach its queue.
    prefix = Path(tempfile.mkdtemp(prefix="deliverd-tarball-test-", dir="/tmp"))
    prefix.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"version": 1, "host": {"name": "tarball.deliverd.test"},
            "listen": [{"address": "127.0.0.1", "port": port}],
            "queue": {"path": f"{prefix}/var/spool/deliverd"},
            "routing": {"mode": "direct"}, "dns": {"nameservers": ["127.0.0.1:9"]}}
    role = {"name": "Deploy", "ansible.builtin.include_role": {"name": "mailops.deliverd.deliverd"},
            "vars": {"deliverd_prefix": str(prefix), "deliverd_spec": spec,
                     "deliverd_service_manager": "supervised",
                     "deliverd_install_from": "wheelhouse"}}
    try:
        proc = _playbook(tmp_path, controller, installed, [role])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            assert c.recv(64).startswith(b"220")
        # The host got the wheel the tarball carries (an installed collection has no checkout),
        # with every dependency beside it.
        wheels = prefix / "opt" / "deliverd" / "dist" / "wheels"
        (shipped,) = wheels.glob("deliverd-*.whl")
        bundled = installed / "ansible_collections" / "mailops" / "deliverd" / "wheels"
        assert shipped.read_bytes() == (bundled / shipped.name).read_bytes()
        assert {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")} >= {
            "jsonschema", "rpds_py", "dkimpy", "uvloop", "aiosmtpd"}
        venv_python = prefix / "opt" / "deliverd" / "venv" / "bin" / "python"
        assert subprocess.run([str(venv_python), "-c", "import uvloop, dkim, deliverd"],
                              capture_output=True, timeout=60, check=False).returncode == 0
    finally:
        role["vars"]["deliverd_state"] = "absent"  # type: ignore[index]
        role["vars"]["deliverd_purge_queue"] = True  # type: ignore[index]
        _playbook(tmp_path, controller, installed, [role])
        shutil.rmtree(prefix, ignore_errors=True)
