"""The ``deliverd`` command: each subcommand lives in its own ``cli_*`` module."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deliverd import __version__

if TYPE_CHECKING:  # imported when needed: `sendmail` runs per message and never parses with it
    import argparse

# Each module has ``register(subparsers)``, which adds its subcommands and sets ``func`` to a
# callable taking the parsed namespace and returning the exit code.
_COMMAND_MODULES = (
    "deliverd.cli.validate",  # validate
    "deliverd.cli.render",  # render, check-config
    "deliverd.cli.run",  # run
    "deliverd.cli.queue",  # queue, send
    "deliverd.cli.probe",  # probe
    "deliverd.cli.dkim",  # dkim record, dkim check
)
# Run as `sendmail` or `mailq` (the role's links), or as `deliverd sendmail`: sendmail's own
# flags, parsed by deliverd.cli.sendmail on a short import path, without argparse or the other
# commands' imports.
_SENDMAIL_NAMES = ("sendmail", "mailq")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="deliverd", description="Declarative outbound mail delivery.",
        epilog="deliverd sendmail [FLAGS] [RECIPIENT...]: the sendmail interface (also run as "
               "sendmail and mailq), with sendmail's own flags.",
    )
    parser.add_argument("--version", action="version", version=f"deliverd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    prog = os.path.basename(sys.argv[0]) if argv is None else "deliverd"
    args_list = list(sys.argv[1:] if argv is None else argv)
    if prog in _SENDMAIL_NAMES or args_list[:1] == ["sendmail"]:
        from deliverd.cli.sendmail import entry

        if prog in _SENDMAIL_NAMES:
            return entry(prog, args_list)
        return entry("sendmail", args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
