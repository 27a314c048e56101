"""The ``deliverd`` command: each subcommand lives in its own ``cli_*`` module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deliverd import __version__

# Each module has ``register(subparsers)``, which adds its subcommands and sets ``func`` to a
# callable taking the parsed namespace and returning the exit code.
_COMMAND_MODULES = (
    "deliverd.cli.validate",  # validate
    "deliverd.cli.render",  # render, check-config
    "deliverd.cli.run",  # run
    "deliverd.cli.queue",  # queue, send
    "deliverd.cli.probe",  # probe
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deliverd", description="Declarative outbound mail delivery."
    )
    parser.add_argument("--version", action="version", version=f"deliverd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
