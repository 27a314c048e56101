"""The config file, ``deliverd.toml``, without its secrets: read and parsed one way for everyone.

The daemon and the CLI read it through the loader (``loader.py``, which reads the secrets file
with ``parse_toml`` too, then merges and re-validates), and ``sendmail`` through
``read_sendmail_settings``; all of them start with ``read_text`` and ``parse_toml`` here, with
the same messages for a file that is missing, unreadable or not TOML. Reading imports nothing
beyond what the interpreter loads at start-up (``posix``, ``errno``), as ``sendmail`` runs it for
every message; ``tomllib`` is imported when a tree is parsed.

``read_sendmail_settings`` is what ``sendmail`` reads: its few keys (``queue.path``,
``host.name``, ``limits.max_message_size``, ``local.*``, ``masquerade.*``) are found by ``scan``
without ``tomllib``, which with the ``re`` it imports costs more than the rest of a run
(``bench/sendmail --config-reader`` measures it). When the scanner is not sure of the file, the
same text is parsed with ``tomllib`` and a config rendered before ``[local]`` and
``[masquerade]`` existed gets their defaults from ``normalise``; both trees go through the same
checks into ``SendmailSettings``.

The scanner reads the TOML that ``deliverd.toml.j2`` renders: table headers, ``key = value``
lines and multi-line arrays, no multi-line strings. Whatever it is not sure of raises
``Unsure``; a wanted key given twice or holding anything but a string or an array of strings is
such a case. What it does not check: values of keys sendmail does not read are only skipped
(strings, arrays, inline tables, bare scalars), so a file TOML refuses in those alone is not
noticed here (the daemon refuses to load it, and ``deliverd check-config`` says why); the mail
waits in the maildrop. ``tests/unit/cli/test_sendmail_fast.py`` holds it to ``tomllib`` on every
example spec and on generated files.
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

# ---------------------------------------------------------------------------------------------
# What sendmail reads


# core.units' sizes, for the spelling normalise writes (core.units imports re).
_SIZE_UNITS = {"GB": 1024**3, "MB": 1024**2, "KB": 1024, "B": 1}


class SendmailSettings:
    """``queue.path``, ``host.name``, ``limits.max_message_size`` (bytes), and ``local.*`` and
    ``masquerade.*`` as the config writes them."""

    def __init__(self, tree: dict[str, Any]) -> None:
        local, masquerade = tree["local"], tree["masquerade"]
        self.queue_path: str = _text(tree["queue"]["path"])
        self.host_name: str = _text(tree["host"]["name"])
        self.max_message_size = _size(_text(tree["limits"]["max_message_size"]))
        self.domains = tuple(_texts(local["domains"]))
        self.qualify_domain: str = _text(local["qualify_domain"])
        aliases = local.get("aliases", {})
        self.aliases = {_text(user): tuple(_texts(targets)) for user, targets in aliases.items()}
        domain = masquerade.get("domain")
        self.masquerade_domain: str | None = None if domain is None else _text(domain)
        self.except_users = tuple(_texts(masquerade["except_users"]))


def read_sendmail_settings(path: str) -> SendmailSettings:
    """The settings of a rendered config; ``ConfigFileError`` when it cannot be read or is not
    a rendered deliverd config."""
    text = read_text(path)
    try:
        tree = scan(text)
    except Unsure:
        tree = parse_toml(path, text)
        if "local" not in tree or "masquerade" not in tree:
            # Rendered before these keys existed: fill their defaults the one way there is.
            from deliverd.spec.normalise import normalise

            tree = normalise(tree)
    return settings_from_tree(path, tree)


def settings_from_tree(path: str, tree: dict[str, Any]) -> SendmailSettings:
    try:
        return SendmailSettings(tree)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigFileError(f"{path}: not a rendered deliverd config "
                              f"(check it with: deliverd check-config {path})") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _texts(value: object) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(value)
    return [_text(item) for item in value]


def _size(text: str) -> int:
    """``core.units.parse_size``, without ``re`` for the spelling ``normalise`` writes."""
    for unit, factor in _SIZE_UNITS.items():
        digits = text[:-len(unit)]
        if (text.endswith(unit) and 1 <= len(digits) <= 12 and digits.isascii()
                and digits.isdigit()):
            return int(digits) * factor
    from deliverd.core.units import parse_size

    return parse_size(text)


# ---------------------------------------------------------------------------------------------
# The scanner


class Unsure(Exception):
    """The text is not one this scanner reads with certainty; tomllib will."""


def scan(text: str) -> dict[str, Any]:
    """The wanted keys of a rendered config as the tree ``tomllib`` would give of them;
    ``Unsure`` for anything else, including a file rendered before ``[local]`` and
    ``[masquerade]`` existed (their defaults are ``normalise``'s to fill)."""
    values, aliases = _scan(text)
    if ("local",) not in values or ("masquerade",) not in values:
        raise Unsure("a config without [local] or [masquerade]")
    tree: dict[str, Any] = {"local": {"aliases": aliases}, "masquerade": {}}
    for key, value in values.items():
        if key in _WANTED:
            tree.setdefault(key[0], {})[key[1]] = value
    return tree


_WANTED = frozenset({("queue", "path"), ("host", "name"), ("limits", "max_message_size"),
                     ("local", "domains"), ("local", "qualify_domain"), ("masquerade", "domain"),
                     ("masquerade", "except_users")})
_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_SCALAR = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+.:")


_TABLE, _ARRAY = "[table]", "[[array of tables]]"  # what a header's own key holds in _scan


def _scan(text: str) -> tuple[dict[tuple[str, ...], object], dict[str, object]]:
    """The wanted keys (and each table header seen, as ``_TABLE`` or ``_ARRAY`` under its own
    key) and ``[local.aliases]``.

    TOML without multi-line strings, where every line is a table header, a ``key = value``
    pair or a line of a multi-line array; a wanted key whose value is not a string or an
    array of strings declines, and so does every line this does not recognise."""
    if '"""' in text or "'''" in text or "\r" in text:
        raise Unsure("multi-line strings")
    values: dict[tuple[str, ...], object] = {}
    aliases: dict[str, object] = {}
    table: tuple[str, ...] = ()
    depth = 0  # open brackets of a multi-line array
    for raw in text.split("\n"):
        line = raw.strip(" \t")
        if depth:
            depth = _skip_value(line, 0, depth)
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            array = line.startswith("[[")
            keys, end = _key(line, 2 if array else 1, "]")
            close = "]]" if array else "]"
            if not line.startswith(close, end) or _skip_value(line, end + len(close), 0):
                raise Unsure("a table header")
            table = tuple(keys)
            kind = _ARRAY if array else _TABLE
            if table in values and (kind, values[table]) != (_ARRAY, _ARRAY):
                raise Unsure("a table twice, or as a table and an array of tables")
            values[table] = kind
            if array:  # a new element: the tables below the previous one are done with
                for below in [k for k in values if k[:len(table)] == table and k != table]:
                    del values[below]
            continue
        keys, end = _key(line, 0, "=")
        full = (*table, *keys)
        if table == ("local", "aliases") and len(keys) == 1:
            if keys[0] in aliases:
                raise Unsure("an alias twice")
            aliases[keys[0]], _ = _value(line, end + 1)
        elif full in _WANTED:
            if full in values:
                raise Unsure("a key twice")
            values[full], _ = _value(line, end + 1)
        elif full[:2] in (("local", "aliases"), ("masquerade",), ("local",)) and len(full) > 2:
            raise Unsure("a dotted key in a table sendmail reads")
        else:
            depth = _skip_value(line, end + 1, 0)
    if depth:
        raise Unsure("an array without its end")
    return values, aliases


def _key(line: str, at: int, stop: str) -> tuple[list[str], int]:
    """A dotted key from ``at`` up to ``stop``; returns its parts and the position of stop."""
    keys: list[str] = []
    while True:
        at = _blank(line, at)
        if line.startswith('"', at):
            part, at = _string(line, at)
        else:
            end = at
            while end < len(line) and line[end] in _BARE_KEY:
                end += 1
            part, at = line[at:end], end
            if not part:
                raise Unsure("a key")
        keys.append(part)
        at = _blank(line, at)
        if line.startswith(stop, at):
            return keys, at
        if not line.startswith(".", at):
            raise Unsure("a key")
        at += 1


def _blank(line: str, at: int) -> int:
    while at < len(line) and line[at] in " \t":
        at += 1
    return at


def _string(line: str, at: int) -> tuple[str, int]:
    """A basic string starting at ``at`` (its quote); returns it and the position after it."""
    out: list[str] = []
    at += 1
    while at < len(line):
        char = line[at]
        if char == '"':
            return "".join(out), at + 1
        if char == "\\":
            code = line[at + 1:at + 2]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                at += 2
                continue
            width = {"u": 4, "U": 8}.get(code)
            digits = line[at + 2:at + 2 + width] if width else ""
            if not width or len(digits) != width or not all(
                    c in "0123456789abcdefABCDEF" for c in digits):
                raise Unsure("a string escape")
            point = int(digits, 16)
            if 0xD800 <= point <= 0xDFFF or point > 0x10FFFF:
                raise Unsure("a string escape")
            out.append(chr(point))
            at += 2 + width
            continue
        if (char < " " and char != "\t") or char == "\x7f":
            raise Unsure("a control character in a string")
        out.append(char)
        at += 1
    raise Unsure("a string without its end")


def _value(line: str, at: int) -> tuple[object, int]:
    """A string or a one-line array of strings at ``at``; nothing but a comment after it."""
    at = _blank(line, at)
    value: object
    if line.startswith('"', at):
        value, at = _string(line, at)
    elif line.startswith("[", at):
        items: list[str] = []
        at = _blank(line, at + 1)
        while not line.startswith("]", at):
            if not line.startswith('"', at):
                raise Unsure("an array that is not of strings on one line")
            item, at = _string(line, at)
            items.append(item)
            at = _blank(line, at)
            if line.startswith(",", at):
                at = _blank(line, at + 1)
            elif not line.startswith("]", at):
                raise Unsure("an array")
        value, at = items, at + 1
    else:
        raise Unsure("a value sendmail needs that is not a string")
    if _skip_value(line, at, 0):
        raise Unsure("a value")
    return value, at


def _skip_value(line: str, at: int, depth: int) -> int:
    """Past a value sendmail does not need (or the rest of a line after one): strings, inline
    tables and arrays, scalars; returns how many arrays are still open at the line's end."""
    braces = 0
    while True:
        at = _blank(line, at)
        if at >= len(line) or line[at] == "#":
            if braces:
                raise Unsure("an inline table over several lines")
            return depth
        char = line[at]
        if char == '"':
            _, at = _string(line, at)
        elif char == "'":
            end = line.find("'", at + 1)
            if end < 0:
                raise Unsure("a literal string without its end")
            at = end + 1
        elif char in "[{":
            depth, braces = (depth + 1, braces) if char == "[" else (depth, braces + 1)
            at += 1
        elif char in "]}":
            if char == "]":
                depth -= 1
            else:
                braces -= 1
            if depth < 0 or braces < 0:
                raise Unsure("unbalanced brackets")
            at += 1
        elif char in ",=" or char in _SCALAR:
            at += 1
        else:
            raise Unsure(f"{char!r} in a value")
