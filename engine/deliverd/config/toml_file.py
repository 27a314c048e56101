"""A config file read from disk: its text, then its TOML tree.

The one way the engine reads ``deliverd.toml`` (world-readable, no secrets): the loader the
daemon and the CLI use (``loader.py``, which reads the secrets file with ``parse_toml`` too) and
what ``sendmail`` reads of it (``sendmail_settings.py``) both start here, with the same messages
for a file that is missing, unreadable or not TOML. Reading imports nothing beyond what the
interpreter loads at start-up (``posix``, ``errno``), as ``sendmail`` runs it for every message;
``tomllib`` is imported when a tree is parsed.
"""

from __future__ import annotations

import errno
import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ConfigFileError(Exception):
    """A file that cannot be read or parsed; the message names the file and never quotes a
    secret."""


def read_text(path: str) -> str:
    """The file's text; ``ConfigFileError`` when it cannot be read or is not UTF-8."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NOCTTY)
        try:
            chunks = []
            while chunk := posix.read(fd, 65536):
                chunks.append(chunk)
        finally:
            posix.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ConfigFileError(f"{path}: no such file") from None
        if exc.errno == errno.EISDIR:
            raise ConfigFileError(f"{path}: is a directory, not a config file") from None
        raise ConfigFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return decode(path, b"".join(chunks))


def decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: is not UTF-8 text (bad byte at offset {exc.start})"
                              ) from None


def parse_toml(path: str, text: str, *, sensitive: bool = False) -> dict[str, Any]:
    """The TOML tree of a file's text; ``sensitive``: the file holds secrets, so an error says
    where it is and not what tomllib quoted (which may be part of a password)."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
        if sensitive:
            import re

            found = re.search(r"\(at (line \d+, column \d+|end of document)\)", detail)
            detail = f"at {found.group(1)}" if found else "somewhere in the file"
        raise ConfigFileError(f"{path}: not valid TOML: {detail}") from None


def read_toml(path: str) -> dict[str, Any]:
    """The TOML tree of a file that holds no secret."""
    return parse_toml(path, read_text(path))
