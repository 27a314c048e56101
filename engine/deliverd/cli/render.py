"""``deliverd render SPEC -o DIR`` and ``deliverd check-config FILE [--secrets PATH]``.

Problems are reported as ``deliverd validate`` does: errors on stdout, one per line with the
JSON pointer first, warnings on stderr. Exit codes: 0 done (valid), 1 invalid, 2 a file could
not be read (or, for render, written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deliverd.cli.validate import EXIT_INVALID, EXIT_UNREADABLE, EXIT_VALID, read_and_check
from deliverd.config.convert import config_from_spec
from deliverd.config.loader import ConfigError, check_config_file, render_problem
from deliverd.config.model import Config
from deliverd.dkim.keys import DkimKeyError, load_key
from deliverd.spec.problems import Problem, errors, plural, pointer, report
from deliverd.spec.render import write_rendered


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    render = subparsers.add_parser(
        "render",
        help="render a spec into deliverd.toml and secrets.toml",
        description="Validate a delivery spec and write the engine config (deliverd.toml, "
        "0644) and its secrets (secrets.toml, 0600) into a directory.",
    )
    render.add_argument("spec", type=Path, metavar="SPEC", help="the delivery spec (YAML)")
    render.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory to write to"
    )
    render.set_defaults(func=run_render)

    check = subparsers.add_parser(
        "check-config",
        help="validate a rendered engine config",
        description="Validate an engine config file with its secrets file, as the engine "
        "loads it. Used by Ansible's template validate: step.",
    )
    check.add_argument("config", type=Path, metavar="FILE", help="the engine config (TOML)")
    check.add_argument(
        "--secrets",
        type=Path,
        metavar="PATH",
        help="the secrets file (default: secrets.toml beside FILE)",
    )
    check.set_defaults(func=run_check_config)


def run_render(args: argparse.Namespace) -> int:
    checked = read_and_check(args.spec, "render")
    if checked is None:
        return EXIT_UNREADABLE
    normalised, problems = checked
    report(problems, render_problem)
    if normalised is None:
        print(f"{args.spec}: invalid ({plural(len(errors(problems)), 'error')})", file=sys.stderr)
        return EXIT_INVALID
    try:
        config_path, secrets_path = write_rendered(normalised, args.output)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"deliverd render: cannot write to {args.output}: {reason}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(config_path)
    print(secrets_path)
    return EXIT_VALID


def run_check_config(args: argparse.Namespace) -> int:
    try:
        tree, found = check_config_file(args.config, args.secrets)
    except ConfigError as exc:
        if exc.unreadable:
            for problem in exc.problems:
                print(f"deliverd check-config: {problem.message}", file=sys.stderr)
            return EXIT_UNREADABLE
        report(exc.problems, render_problem)
        print(f"{args.config}: invalid ({plural(len(exc.problems), 'error')})", file=sys.stderr)
        return EXIT_INVALID
    config = config_from_spec(tree)
    unusable = dkim_key_problems(config)
    report(found + unusable, render_problem)
    if unusable:
        print(f"{args.config}: invalid ({plural(len(unusable), 'error')})", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.config}: valid ({summary(config)})")
    return EXIT_VALID


def dkim_key_problems(config: Config) -> list[Problem]:
    """Every DKIM key the engine could not sign with (``validate`` and ``render`` of a spec
    never read keys: they may be made on the host after the spec is written)."""
    problems = []
    for index, entry in enumerate(config.dkim):
        try:
            load_key(entry)
        except DkimKeyError as exc:
            problems.append(Problem(
                pointer("dkim", index, "key_file"), str(exc),
                "make it with dknewkey (readable by the engine's user, mode 0600), or fix "
                "key_file",
            ))
    return problems


def summary(config: Config) -> str:
    """One line describing a config, with nothing secret in it."""
    routing = config.routing
    parts = [f"mode {routing.mode.value}"]
    smarthost = routing.smarthost
    if smarthost is not None:
        auth = ", auth" if smarthost.auth is not None else ""
        pop = ", pop-before-smtp" if smarthost.pop_before_smtp is not None else ""
        tls = smarthost.tls.value
        hosts = ", ".join(f"{h.host}:{h.port}" for h in smarthost.targets)
        parts.append(f"smart host {hosts} ({tls}{auth}{pop})")
    listeners = ", ".join(f"{x.address}:{x.port}" for x in config.listen)
    parts.append(f"listening on {listeners}")
    parts.append(f"{len(config.accounts)} account(s)")
    return "; ".join(parts)


