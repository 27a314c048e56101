"""``deliverd validate SPEC``: every problem of a spec file, or its normalised form."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from deliverd.spec.problems import Problem, errors, plural, report, warnings
from deliverd.spec.specfile import SpecFileError, load_spec_file
from deliverd.spec.validation import check_spec, redact_secrets

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a delivery spec against the schema and the delivery rules",
        description=(
            "Check a delivery spec (YAML or JSON). Errors go to stdout, one per line with the "
            "JSON pointer first; warnings go to stderr. Exit 0: valid (warnings allowed), "
            "1: invalid, 2: the file cannot be read."
        ),
    )
    parser.add_argument("spec", metavar="SPEC", help="the spec file")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json", action="store_true", help="print every problem as a JSON list on stdout"
    )
    output.add_argument(
        "--normalised",
        action="store_true",
        help="print the spec with every default filled in (YAML), secrets redacted",
    )
    parser.add_argument(
        "--show-secrets",
        action="store_true",
        help="with --normalised, print passwords instead of <redacted>",
    )
    parser.set_defaults(func=run)


def read_and_check(path: str, command: str) -> tuple[dict[str, Any] | None, list[Problem]] | None:
    """The spec file at ``path`` checked (normalised spec or None, problems); None when the
    file cannot be read, after saying why on stderr."""
    try:
        spec = load_spec_file(path)
    except SpecFileError as exc:
        print(f"deliverd {command}: {exc}", file=sys.stderr)
        return None
    return check_spec(spec)


def run(args: argparse.Namespace) -> int:
    checked = read_and_check(args.spec, "validate")
    if checked is None:
        return EXIT_UNREADABLE
    normalised, problems = checked
    if args.json:
        print(json.dumps([p.as_dict() for p in problems], indent=2))
        return EXIT_VALID if normalised is not None else EXIT_INVALID
    report(problems)
    if normalised is None:
        count = len(errors(problems))
        print(f"{args.spec}: invalid ({plural(count, 'error')})", file=sys.stderr)
        return EXIT_INVALID
    if args.normalised:
        shown = normalised if args.show_secrets else redact_secrets(normalised)
        print(_to_yaml(shown), end="")
    else:
        mode = normalised["routing"]["mode"]
        count = len(warnings(problems))
        print(f"{args.spec}: valid (mode={mode}, {plural(count, 'warning')})")
    return EXIT_VALID




def _to_yaml(spec: object) -> str:
    text: str = yaml.safe_dump(spec, sort_keys=False, default_flow_style=False, width=100)
    return text
