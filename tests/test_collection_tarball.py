"""The collection as Galaxy would serve it: ``make collection`` builds a tarball that carries the
engine's wheel; installed into an empty collections path, its spec action validates with that
wheel on a controller whose own deliverd is out of reach, and its role deploys a host from it."""

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

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.integration]

if not (BIN / "ansible-galaxy").exists():
    pytest.skip("ansible-galaxy is not installed in the venv", allow_module_level=True)

# Hides the checkout's engine (the venv's editable install) from ansible-playbook, as on a
# controller where deliverd is not installed; a deliverd found anywhere else still imports.
BLOCKER = """import sys
from importlib.machinery import PathFinder
class _HideCheckout:
    def find_spec(self, name, path=None, target=None):
        if name == "deliverd" or name.startswith("deliverd."):
            spec = PathFinder.find_spec(name, path)
            if spec is not None and (spec.origin or "").startswith({engine!r}):
                raise ImportError("no deliverd on this controller")
        return None
sys.meta_path.insert(0, _HideCheckout())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tarball from make collection, installed into an empty collections path."""
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
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline",
                    "-p", str(root), str(tarball)], cwd=root, check=True, capture_output=True,
                   timeout=300, env={**os.environ, "ANSIBLE_CONFIG": str(config)})
    assert (root / "ansible_collections" / "mailops" / "deliverd" / "wheels").is_dir()
    return root


def _playbook(tmp: Path, collections: Path, tasks: list[dict[str, object]],
              *extra: str) -> subprocess.CompletedProcess[str]:
    block = tmp / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(
        BLOCKER.format(engine=str(REPO / "engine")), encoding="utf-8")
    (tmp / "ansible.cfg").write_text("[defaults]\n", encoding="utf-8")
    (tmp / "play.yml").write_text(yaml.safe_dump([{
        "name": "Use the installed collection", "hosts": "localhost", "gather_facts": False,
        "tasks": tasks}]), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(block), "ANSIBLE_CONFIG": str(tmp / "ansible.cfg"),
           "ANSIBLE_COLLECTIONS_PATH": str(collections), "XDG_CACHE_HOME": str(tmp / "cache"),
           "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", *extra, str(tmp / "play.yml")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_spec_action_validates_with_the_bundled_wheel(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = _playbook(tmp_path, installed, [
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
    unpacked = list((tmp_path / "cache" / "mailops.deliverd").iterdir())
    assert len(unpacked) == 1 and unpacked[0].name.startswith("deliverd-")


@pytest.mark.skipif(os.geteuid() != 0, reason="the role creates a system user: run as root")
def test_role_from_the_installed_collection_deploys_a_host(installed: Path,
                                                           tmp_path: Path) -> None:
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
                     "deliverd_service_manager": "supervised", "deliverd_extras": []}}
    try:
        proc = _playbook(tmp_path, installed, [role])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            assert c.recv(64).startswith(b"220")
        # The host got the wheel the tarball carries (an installed collection has no checkout).
        (shipped,) = (prefix / "opt" / "deliverd" / "dist").glob("deliverd-*.whl")
        bundled = installed / "ansible_collections" / "mailops" / "deliverd" / "wheels"
        assert shipped.read_bytes() == (bundled / shipped.name).read_bytes()
    finally:
        role["vars"]["deliverd_state"] = "absent"  # type: ignore[index]
        role["vars"]["deliverd_purge_queue"] = True  # type: ignore[index]
        _playbook(tmp_path, installed, [role])
        shutil.rmtree(prefix, ignore_errors=True)
