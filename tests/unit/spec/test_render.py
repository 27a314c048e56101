"""The templates render the examples, write safe files, and give Ansible's bytes exactly."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from deliverd.config.convert import config_to_spec
from deliverd.config.loader import load_config
from deliverd.spec import render
from deliverd.spec.problems import errors
from deliverd.spec.render import render_config, write_rendered
from deliverd.spec.resources import templates_dir
from deliverd.spec.specfile import load_spec_file
from deliverd.spec.validation import check_spec
from tests.fixtures import paths

EXAMPLES_DIR = paths.EXAMPLES
EXAMPLES = ["direct", "smarthost", "fallback", "routes"]
HEADER = "# managed by deliverd; rendered from the delivery spec\n"


def _example(name: str) -> dict[str, Any]:
    normalised, problems = check_spec(load_spec_file(EXAMPLES_DIR / f"{name}.yml"))
    assert normalised is not None, [p.render() for p in errors(problems)]
    return normalised


def _tricky() -> dict[str, Any]:
    """Quotes, backslashes, unicode beyond the BMP and control characters in every kind of
    string the templates quote (no "{{": Ansible would template it in a variable)."""
    normalised, problems = check_spec(
        {
            "version": 1,
            "host": {"name": "mail.example.com"},
            "queue": {"path": '/var/spool/dé"liv\\erd 😀'},
            "routing": {
                "mode": "smarthost",
                "smarthost": {
                    "host": "smtp.example.net",
                    "port": 587,
                    "ca_file": "/etc/ssl/'''ca'''.pem",
                    "auth": {"username": 'us"er\\', "password": 'pw-"""\n\t\x00\x7f😀\\'},
                },
            },
            "accounts": [{"address": 'o"dd@exämple.com', "mail_password": "pw-ü"}],
        }
    )
    assert normalised is not None, [p.render() for p in errors(problems)]
    return normalised


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_renders_to_files_the_loader_reads_back(name: str, tmp_path: Path) -> None:
    spec = _example(name)
    config_path, secrets_path = write_rendered(spec, tmp_path)
    config = config_path.read_text(encoding="utf-8")
    assert config.startswith(HEADER)
    assert secrets_path.read_text(encoding="utf-8").startswith(HEADER)
    assert "change-me" not in config
    assert config_to_spec(load_config(config_path)) == spec


def test_fallback_example_secrets_hold_every_password_in_the_documented_tables() -> None:
    _, secrets = render_config(_example("fallback"))
    assert tomllib.loads(secrets) == {
        "routing": {
            "smarthost": {
                "auth": {"password": "change-me-smarthost-password"},
                "pop_before_smtp": {"password": "change-me-pop-password"},
            }
        },
        "accounts": {
            "billing@example.com": {"smarthost_password": "change-me-billing-password"},
            "support@example.com": {
                "smarthost_password": "change-me-support-password",
                "mail_password": "change-me-support-mail-password",
            },
        },
    }


def test_spec_without_secrets_renders_a_secrets_file_with_only_the_header() -> None:
    _, secrets = render_config(_example("direct"))
    body = [line for line in secrets.splitlines() if not line.startswith("#")]
    assert secrets.startswith(HEADER)
    assert body == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_written_files_have_modes_0644_and_0600(name: str, tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        config_path, secrets_path = write_rendered(_example(name), tmp_path / "out")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(secrets_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deliverd.toml", "secrets.toml"]


def test_secrets_file_is_created_0600_exclusively_not_chmodded_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(render.os, "open", spy)
    (tmp_path / "secrets.toml").write_text("old", encoding="utf-8")
    (tmp_path / "secrets.toml").chmod(0o644)
    write_rendered(_example("fallback"), tmp_path)

    creations = [(p, f, m) for p, f, m in opened if f & os.O_CREAT]
    secrets_temp = [c for c in creations if ".secrets.toml." in c[0]]
    assert len(secrets_temp) == 1
    _, flags, mode = secrets_temp[0]
    assert flags & os.O_EXCL and mode == 0o600
    assert stat.S_IMODE((tmp_path / "secrets.toml").stat().st_mode) == 0o600


def test_rendering_twice_gives_identical_bytes(tmp_path: Path) -> None:
    spec = _example("fallback")
    first = [p.read_bytes() for p in write_rendered(spec, tmp_path / "a")]
    second = [p.read_bytes() for p in write_rendered(spec, tmp_path / "b")]
    assert first == second
    assert render_config(spec) == render_config(spec)


def test_tricky_strings_render_as_toml_that_reads_back_the_same() -> None:
    spec = _tricky()
    config, secrets = render_config(spec)
    parsed = tomllib.loads(config)
    assert parsed["queue"]["path"] == spec["queue"]["path"]
    assert parsed["routing"]["smarthost"]["ca_file"] == spec["routing"]["smarthost"]["ca_file"]
    assert tomllib.loads(secrets)["routing"]["smarthost"]["auth"]["password"] == (
        spec["routing"]["smarthost"]["auth"]["password"]
    )


def _ansible_render(specs: dict[str, dict[str, Any]], work: Path) -> dict[str, bytes]:
    """Render both templates for every spec with ansible-playbook's template module."""
    out = work / "out"
    out.mkdir()
    variables = {"specs": specs, "ansible_python_interpreter": sys.executable}
    (work / "vars.json").write_text(json.dumps(variables), encoding="utf-8")
    playbook = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Render like the role does",
                    "ansible.builtin.template": {
                        "src": f"{templates_dir()}/{{{{ item.1 }}}}.toml.j2",
                        "dest": f"{out}/{{{{ item.0 }}}}-{{{{ item.1 }}}}.toml",
                        "mode": "0600",
                    },
                    "vars": {"deliverd_spec": "{{ specs[item.0] }}"},
                    "loop": "{{ specs.keys() | product(['deliverd', 'secrets']) | list }}",
                }
            ],
        }
    ]
    (work / "playbook.yml").write_text(json.dumps(playbook), encoding="utf-8")
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(work / "home"),
        "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
        "ANSIBLE_REMOTE_TMP": str(work / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    }
    env.pop("ANSIBLE_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "ansible.cli.playbook", "-i", "localhost,", "-c", "local",
         "-e", "@vars.json", "playbook.yml"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_ansible_template_module_renders_the_same_bytes(tmp_path: Path) -> None:
    pytest.importorskip("ansible")
    specs = {name: _example(name) for name in EXAMPLES}
    specs["tricky"] = _tricky()
    rendered = _ansible_render(specs, tmp_path)
    assert len(rendered) == 2 * len(specs)
    for name, spec in specs.items():
        config, secrets = render_config(spec)
        assert rendered[f"{name}-deliverd.toml"] == config.encode("utf-8"), name
        assert rendered[f"{name}-secrets.toml"] == secrets.encode("utf-8"), name
