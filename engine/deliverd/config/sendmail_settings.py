"""What ``sendmail`` reads of the config: only the world-readable file, never the secrets.

One function, ``read_sendmail_settings``, for every ``sendmail`` run: the file is read as the
loader reads it (``toml_file``), its few keys are found by ``toml_scan`` without ``tomllib``
(which costs more than the rest of a run), and when the scanner is not sure of the file, the
same text is parsed with ``tomllib`` and a config rendered before ``[local]`` and
``[masquerade]`` existed gets their defaults from ``normalise``. Both trees go through the same
checks into ``SendmailSettings``. ``bench/sendmail --config-reader`` measures what the scanner
saves. Standard library start-up modules only, unless the scanner declines.
"""

from __future__ import annotations

from deliverd.config.toml_file import ConfigFileError, parse_toml, read_text
from deliverd.config.toml_scan import Unsure, scan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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
