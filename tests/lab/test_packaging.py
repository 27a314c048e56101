"""The wheel carries the one schema and the role's templates as package data, and an installed
(non-editable) deliverd validates and renders with them."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.fixtures import paths

REPO = paths.REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(REPO)], check=True, timeout=300)
    (built,) = out.glob("deliverd-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_the_schema_and_templates_byte_for_byte(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {
            "deliverd/_data/delivery-spec.schema.json": REPO / "schemas/delivery-spec.schema.json",
            "deliverd/_data/templates/deliverd.toml.j2":
                REPO / "roles/deliverd/templates/deliverd.toml.j2",
            "deliverd/_data/templates/secrets.toml.j2":
                REPO / "roles/deliverd/templates/secrets.toml.j2",
        }
        for name, source in shipped.items():
            assert name in names
            assert zf.read(name) == source.read_bytes()
        assert "deliverd/py.typed" in names


@pytest.mark.slow
def test_wheel_carries_no_test_lab_code(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        code = [n for n in zf.namelist() if not n.startswith("deliverd-")]
    assert code, "the wheel is empty"
    assert all(n.startswith("deliverd/") for n in code), code
    lab = [n for n in code if "lab" in Path(n).parts or "deliverd_lab" in n]
    assert not lab, f"test lab code in the wheel: {lab}"
    assert not any("postfix" in n or "dnsmasq" in n or "dovecot" in n for n in code)


@pytest.mark.slow
def test_installed_wheel_validates_and_renders_outside_the_checkout(wheel: Path,
                                                                    tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True,
                   timeout=600)
    spec = REPO / "examples" / "smarthost.yml"
    checked = subprocess.run([str(env_dir / "bin" / "deliverd"), "validate", str(spec)],
                             capture_output=True, text=True, cwd=tmp_path, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rendered = subprocess.run([str(env_dir / "bin" / "deliverd"), "render", str(spec), "-o",
                               str(tmp_path / "out")], capture_output=True, text=True,
                              cwd=tmp_path, check=False)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    where = subprocess.run([str(python), "-c", "import deliverd.spec.resources as r; "
                            "print(r.schema_path()); print(r.templates_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, check=True)
    assert str(REPO) not in where.stdout  # from the wheel's _data, not this checkout
    helped = subprocess.run([str(env_dir / "bin" / "deliverd"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path, check=False)
    assert helped.returncode == 0, helped.stderr
    assert "validate" in helped.stdout and "queue" in helped.stdout
    no_lab = subprocess.run([str(python), "-c", "import deliverd_lab"], capture_output=True,
                            text=True, cwd=tmp_path, check=False)
    assert no_lab.returncode != 0 and "ModuleNotFoundError" in no_lab.stderr


@pytest.mark.slow
def test_wheel_installs_the_manual_pages_into_the_venv_share(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        data = {Path(n).name for n in zf.namelist()
                if n.split("/", 1)[0].endswith(".data") and "/data/share/man/man8/" in n}
    assert data == {p.name for p in (REPO / "man" / "man8").iterdir()}
