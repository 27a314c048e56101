"""Load the engine config: the rendered TOML plus its secrets file, judged by the spec validator.

``deliverd.toml`` holds the normalised spec without its passwords; ``secrets.toml`` (0600) holds
only the passwords. Loading merges them back into one spec tree and validates it with the same
validator as a spec file, so the engine never trusts a config the schema would refuse. Every
failure is a ``ConfigError`` listing problems with JSON pointers; no message carries a secret.
Both files are read and parsed by ``config_file``, as ``sendmail`` reads the config.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deliverd.config.config_file import ConfigFileError, decode, parse_toml, read_text
from deliverd.config.convert import config_from_spec
from deliverd.config.model import Config
from deliverd.spec.normalise import normalise
from deliverd.spec.problems import Problem, errors, pointer, warnings
from deliverd.spec.render import SECRETS_NAME
from deliverd.spec.validation import validate_spec

# Keys that hold secrets wherever they appear (the schema marks each with x-secret).
SECRET_KEYS = frozenset({"password", "mail_password"})
# How a secrets file names an account's secrets, and where each goes in the account.
_ACCOUNT_SECRETS: dict[str, tuple[str, ...]] = {
    "smarthost_password": ("smarthost_auth", "password"),
    "mail_password": ("mail_password",),
}


class ConfigError(Exception):
    """A config that cannot be used; ``unreadable`` when a file could not be read or parsed."""

    def __init__(self, problems: Sequence[Problem], *, unreadable: bool = False) -> None:
        self.problems = list(problems)
        self.unreadable = unreadable
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(render_problem(problem) for problem in self.problems)


def render_problem(problem: Problem) -> str:
    """One line; a problem with the file itself (no pointer) is not shown as one at "/"."""
    if problem.pointer:
        return problem.render()
    return f"{problem.message} (hint: {problem.hint})" if problem.hint else problem.message


def load_config(path: str | Path, secrets_path: str | Path | None = None) -> Config:
    """The typed engine config from a rendered config file and its secrets file."""
    return config_from_spec(load_config_tree(path, secrets_path))


def load_config_tree(path: str | Path, secrets_path: str | Path | None = None) -> dict[str, Any]:
    """The normalised spec (secrets included) from a config file and its secrets file."""
    tree, _ = check_config_file(path, secrets_path)
    return tree


def check_config_file(
    path: str | Path, secrets_path: str | Path | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """(normalised spec, warnings); ``ConfigError`` with every error when it is not valid."""
    config_path = Path(path)
    secrets_file = Path(secrets_path) if secrets_path is not None else default_secrets_path(path)
    try:
        tree = parse_toml(str(config_path), read_text(str(config_path)))
    except ConfigFileError as exc:
        raise _fail(str(exc)) from None
    secrets = _read_secrets(secrets_file)
    problems = _secrets_in_config(tree, config_path, secrets_file)
    if secrets is not None:
        problems += _merge_secrets(tree, secrets, config_path, secrets_file)
    if errors(problems):
        raise ConfigError(errors(problems))
    problems = validate_spec(tree)
    if errors(problems):
        missing = _tables_missing_password(tree)
        raise ConfigError(
            [_explain_missing(p, missing, secrets_file, secrets is None) for p in errors(problems)]
        )
    return normalise(tree), warnings(problems)


def default_secrets_path(config_path: str | Path) -> Path:
    """Where the secrets of a config file live unless told otherwise: beside it."""
    return Path(config_path).parent / SECRETS_NAME


def _fail(message: str, hint: str = "", *, where: str = "", unreadable: bool = True) -> ConfigError:
    return ConfigError([Problem(where, message, hint)], unreadable=unreadable)


def _read_secrets(path: Path) -> dict[str, Any] | None:
    """The secrets table, or None when there is no secrets file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _fail(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        # fstat of the open file: the mode checked is the mode of the file read.
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _fail(f"{path}: is not a regular file")
        if info.st_mode & 0o077:
            raise _fail(
                f"{path}: secrets file is readable or writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); refusing to use it",
                f"chmod 600 {path}",
                unreadable=False,
            )
        try:
            data = fh.read()
        except OSError as exc:
            raise _fail(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return parse_toml(str(path), decode(str(path), data), sensitive=True)
    except ConfigFileError as exc:
        raise _fail(str(exc)) from None


def _secrets_in_config(tree: dict[str, Any], config: Path, secrets: Path) -> list[Problem]:
    """A password written into the config file, which is world-readable by design."""
    return [
        Problem(
            where,
            f"a secret in {config}, which is not a secrets file",
            f"passwords belong in {secrets} (mode 0600); render both files with deliverd render",
        )
        for where in _secret_pointers(tree, ())
    ]


def _secret_pointers(node: object, path: tuple[str | int, ...]) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS:
                found.append(pointer(*path, key))
            else:
                found += _secret_pointers(value, (*path, key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += _secret_pointers(item, (*path, index))
    return found


def _merge_secrets(
    tree: dict[str, Any], secrets: dict[str, Any], config: Path, secrets_file: Path
) -> list[Problem]:
    problems: list[Problem] = []
    for key, value in secrets.items():
        if key == "routing":
            problems += _merge_routing(tree, value, secrets_file)
        elif key == "accounts":
            problems += _merge_accounts(tree, value, config, secrets_file)
        elif key == "routes":
            problems += _merge_routes(tree, value, config, secrets_file)
        else:
            problems.append(
                Problem(
                    pointer(key),
                    f"{secrets_file}: unknown table {key!r}",
                    "a secrets file has only [routing.smarthost.*], [routes.\"NAME\".smarthost.*]"
                    " and [accounts.\"ADDRESS\"]",
                )
            )
    return problems


def _merge_routing(tree: dict[str, Any], secrets: object, secrets_file: Path) -> list[Problem]:
    not_passwords = _non_password_leaves(secrets, ("routing",))
    if not_passwords:
        return [
            Problem(
                where,
                f"{secrets_file}: only passwords belong in the secrets file",
                "put every other setting in the config file",
            )
            for where in not_passwords
        ]
    assert isinstance(secrets, dict)  # a leaf would have been refused above
    routing = tree.setdefault("routing", {})
    if isinstance(routing, dict):
        _deep_merge(routing, secrets)
    return []


def _merge_routes(
    tree: dict[str, Any], secrets: object, config: Path, secrets_file: Path
) -> list[Problem]:
    """``[routes."NAME".smarthost.auth] password`` into the route of that name."""
    not_passwords = _non_password_leaves(secrets, ("routes",))
    if not_passwords:
        return [
            Problem(where, f"{secrets_file}: only passwords belong in the secrets file",
                    "put every other setting in the config file")
            for where in not_passwords
        ]
    assert isinstance(secrets, dict)  # a leaf would have been refused above
    routes = tree.get("routes")
    by_name = {r.get("name"): r for r in routes if isinstance(r, dict)} if isinstance(
        routes, list) else {}
    problems: list[Problem] = []
    for name, subtree in secrets.items():
        route = by_name.get(name)
        if route is None:
            problems.append(Problem(
                pointer("routes", name),
                f"{secrets_file}: a password for route {name!r}, which {config} does not have",
                "render both files from the same spec with deliverd render",
            ))
        elif isinstance(subtree, dict):
            _deep_merge(route, subtree)
    return problems


def _non_password_leaves(node: object, path: tuple[str, ...]) -> list[str]:
    if not isinstance(node, dict):
        return [] if path[-1] == "password" else [pointer(*path)]
    found: list[str] = []
    for key, value in node.items():
        found += _non_password_leaves(value, (*path, key))
    return found


def _deep_merge(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        existing = target.get(key)
        if isinstance(value, dict) and isinstance(existing, dict):
            _deep_merge(existing, value)
        elif key not in target:
            target[key] = value
        # Anything else is a conflict with the config file; its own problem was reported.


def _merge_accounts(
    tree: dict[str, Any], secrets: object, config: Path, secrets_file: Path
) -> list[Problem]:
    where = pointer("accounts")
    if not isinstance(secrets, dict):
        return [Problem(where, f"{secrets_file}: accounts must be tables named by address")]
    accounts = tree.get("accounts", [])
    by_address: dict[str, list[dict[str, Any]]] = {}
    if isinstance(accounts, list):
        for account in accounts:
            if isinstance(account, dict) and isinstance(account.get("address"), str):
                by_address.setdefault(account["address"], []).append(account)
    problems: list[Problem] = []
    for address, values in secrets.items():
        targets = by_address.get(address)
        if targets is None:
            problems.append(
                Problem(
                    where,
                    f"{secrets_file}: secrets for account {address!r}, "
                    f"which is not in {config}",
                    "render the config and secrets files together from one spec",
                )
            )
            continue
        if not isinstance(values, dict) or not set(values) <= set(_ACCOUNT_SECRETS):
            problems.append(
                Problem(
                    where,
                    f"{secrets_file}: account {address!r} may have only "
                    + " and ".join(_ACCOUNT_SECRETS),
                )
            )
            continue
        for target in targets:
            for name, value in values.items():
                _put(target, _ACCOUNT_SECRETS[name], value)
    return problems


def _put(target: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            return  # the schema reports the malformed table
        target = child
    target.setdefault(path[-1], value)


def _tables_missing_password(tree: dict[str, Any]) -> set[str]:
    """Pointers of credential tables that need a password from the secrets file and lack it."""
    candidates: list[tuple[object, tuple[str | int, ...]]] = []
    routing = tree.get("routing")
    smarthost = routing.get("smarthost") if isinstance(routing, dict) else None
    if isinstance(smarthost, dict):
        for key in ("auth", "pop_before_smtp"):
            candidates.append((smarthost.get(key), ("routing", "smarthost", key)))
    accounts = tree.get("accounts")
    if isinstance(accounts, list):
        for index, account in enumerate(accounts):
            if isinstance(account, dict):
                path = ("accounts", index, "smarthost_auth")
                candidates.append((account.get("smarthost_auth"), path))
    return {
        pointer(*path)
        for table, path in candidates
        if isinstance(table, dict) and "password" not in table
    }


def _explain_missing(
    problem: Problem, missing: set[str], secrets_file: Path, file_missing: bool
) -> Problem:
    """Point a "password is required" error at the secrets file, where passwords live."""
    if problem.pointer.removesuffix("/password") not in missing:
        return problem
    why = "which does not exist" if file_missing else "which has no value for it"
    return Problem(
        problem.pointer,
        problem.message,
        f"passwords are read from the secrets file {secrets_file}, {why}",
        problem.severity,
    )
