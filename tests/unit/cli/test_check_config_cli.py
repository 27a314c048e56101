"""``deliverd check-config`` and ``deliverd render`` as a shell or Ansible's validate: runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import paths

EXAMPLES_DIR = paths.EXAMPLES
PASSWORDS = [
    "change-me-smarthost-password",
    "change-me-pop-password",
    "change-me-billing-password",
    "change-me-support-password",
    "change-me-support-mail-password",
]


def deliverd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "deliverd", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    for password in PASSWORDS:
        assert password not in result.stdout + result.stderr
    return result


def _render(example: str, out: Path) -> tuple[Path, Path]:
    result = deliverd("render", EXAMPLES_DIR / f"{example}.yml", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr
    config, secrets = out / "deliverd.toml", out / "secrets.toml"
    assert result.stdout.splitlines() == [str(config), str(secrets)]
    return config, secrets


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each example rendered once by the CLI; tests copy what they break."""
    base = tmp_path_factory.mktemp("rendered")
    return {name: _render(name, base / name)[0].parent for name in ("smarthost", "fallback")}


def _copy(rendered_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    target = tmp_path / "etc"
    shutil.copytree(rendered_dir, target)
    return target / "deliverd.toml", target / "secrets.toml"


def _error_pointers(stdout: str) -> list[str]:
    return [line.split(":", 1)[0] for line in stdout.splitlines()]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_rendered_config_is_valid_with_a_one_line_summary(rendered: dict[str, Path]) -> None:
    result = deliverd("check-config", rendered["fallback"] / "deliverd.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\n") == 1
    assert "valid" in result.stdout and "relay.example.net:25" in result.stdout


def test_port_out_of_range_is_invalid_at_its_pointer(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    config, _ = _copy(rendered["smarthost"], tmp_path)
    _edit(config, "port = 587", "port = 70000")
    result = deliverd("check-config", config)
    assert result.returncode == 1
    assert _error_pointers(result.stdout) == ["/routing/smarthost/port"]
    assert "70000" in result.stdout


def test_unknown_key_is_invalid_at_its_pointer(rendered: dict[str, Path], tmp_path: Path) -> None:
    config, _ = _copy(rendered["smarthost"], tmp_path)
    _edit(config, "[queue]\n", '[queue]\ncolour = "blue"\n')
    result = deliverd("check-config", config)
    assert result.returncode == 1
    assert _error_pointers(result.stdout) == ["/queue/colour"]


def test_missing_secrets_file_with_auth_names_the_password_and_the_file(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    config, secrets = _copy(rendered["smarthost"], tmp_path)
    secrets.unlink()
    result = deliverd("check-config", config)
    assert result.returncode == 1
    assert _error_pointers(result.stdout) == ["/routing/smarthost/auth/password"]
    assert str(secrets) in result.stdout and "does not exist" in result.stdout


def test_secrets_option_reads_secrets_from_another_directory(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    # Ansible's validate: renders the config to a temp file away from /etc/deliverd.
    secrets = tmp_path / "etc" / "secrets.toml"
    secrets.parent.mkdir()
    shutil.copy2(rendered["fallback"] / "secrets.toml", secrets)
    staged = tmp_path / "ansible-tmp" / "tmpabc123"
    staged.parent.mkdir()
    shutil.copy2(rendered["fallback"] / "deliverd.toml", staged)

    assert deliverd("check-config", staged).returncode == 1
    result = deliverd("check-config", "--secrets", secrets, staged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_group_readable_secrets_file_is_refused(rendered: dict[str, Path], tmp_path: Path) -> None:
    config, secrets = _copy(rendered["fallback"], tmp_path)
    secrets.chmod(0o644)
    result = deliverd("check-config", config)
    assert result.returncode == 1
    assert "chmod 600" in result.stdout and "refusing" in result.stdout


def test_secret_for_unknown_account_is_invalid_at_accounts(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    config, _ = _copy(rendered["fallback"], tmp_path)
    _edit(config, 'address = "billing@example.com"', 'address = "finance@example.com"')
    result = deliverd("check-config", config)
    assert result.returncode == 1
    assert _error_pointers(result.stdout) == ["/accounts"]
    assert "billing@example.com" in result.stdout


def test_missing_config_file_is_unreadable(tmp_path: Path) -> None:
    result = deliverd("check-config", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_broken_toml_is_unreadable_with_file_and_line(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    config, _ = _copy(rendered["smarthost"], tmp_path)
    _edit(config, "[queue]\n", "[queue\n")
    result = deliverd("check-config", config)
    assert result.returncode == 2
    assert str(config) in result.stderr and "line" in result.stderr


def test_render_of_an_invalid_spec_prints_pointers_and_writes_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yml"
    spec.write_text(
        "version: 1\nhost: {name: mail.example.com}\n"
        "routing: {mode: smarthost, smarthost: {host: smtp.example.net, port: 70000}}\n",
        encoding="utf-8",
    )
    result = deliverd("render", spec, "-o", tmp_path / "out")
    assert result.returncode == 1
    assert _error_pointers(result.stdout) == ["/routing/smarthost/port"]
    assert not (tmp_path / "out").exists()


def test_render_of_an_unreadable_spec_exits_2(tmp_path: Path) -> None:
    result = deliverd("render", tmp_path / "missing.yml", "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "missing.yml" in result.stderr


def test_render_writes_secrets_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _, secrets = _render("fallback", tmp_path / "out")
    finally:
        os.umask(old)
    assert secrets.stat().st_mode & 0o777 == 0o600
