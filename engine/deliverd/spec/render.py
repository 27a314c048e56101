"""Render a normalised spec into the engine config and its secrets file, as Ansible would.

The templates are the role's own (``roles/deliverd/templates``), rendered here with the options
Ansible's ``template`` module uses, so ``deliverd render`` and a deployment write the same bytes.
Files are replaced atomically; the secrets file is created 0600 and is never readable by anyone
else, not even for the instant between creation and a chmod.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import jinja2

from deliverd.spec.resources import templates_dir

CONFIG_TEMPLATE = "deliverd.toml.j2"
SECRETS_TEMPLATE = "secrets.toml.j2"
CONFIG_NAME = "deliverd.toml"
SECRETS_NAME = "secrets.toml"
CONFIG_MODE = 0o644
SECRETS_MODE = 0o600


def _environment() -> jinja2.Environment:
    # Ansible's template module: trim_blocks on, lstrip_blocks off, no autoescape; it restores
    # the template's trailing newlines itself, which keep_trailing_newline does here.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        trim_blocks=True,
        lstrip_blocks=False,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 -- TOML, not HTML: the templates quote every string
    )


def render_config(normalised: Mapping[str, object]) -> tuple[str, str]:
    """(config text, secrets text) for a normalised spec."""
    env = _environment()
    variables = {"deliverd_spec": normalised}
    config = env.get_template(CONFIG_TEMPLATE).render(variables)
    secrets_text = env.get_template(SECRETS_TEMPLATE).render(variables)
    return config, secrets_text


def write_rendered(normalised: Mapping[str, object], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``deliverd.toml`` (0644) and ``secrets.toml`` (0600) into out_dir, atomically."""
    config, secrets_text = render_config(normalised)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_NAME
    secrets_path = directory / SECRETS_NAME
    # Secrets first: a config that needs them never lands beside a stale secrets file.
    write_atomic(secrets_path, secrets_text, SECRETS_MODE)
    write_atomic(config_path, config, CONFIG_MODE)
    return config_path, secrets_path


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace path with text: exclusive temp file created with mode, fsync, rename, fsync dir."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write into a file (or symlink) someone else prepared under the temp name.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits the caller asked for
            data = text.encode("utf-8")
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
