"""Write the manual pages from the ``deliverd`` command's own argparse definitions.

``python man/generate.py [DIR]`` (``make man``) writes deliverd(8) and one page per command
(deliverd-run(8), ...) into DIR (default: ``man/man8``, which the wheel installs as
``share/man/man8`` of its venv). The pages are committed so that a wheel
can be built without the generator; ``tests/lab/test_manpages.py`` fails when they are out of date.
The formatting is argparse-manpage's; only the header and NAME lines are ours, because its
title for a subcommand ("DELIVERD RUN") is not a page name and it would stamp today's date.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage

from deliverd import __version__
from deliverd.cli.main import build_parser

SECTION = "8"
MANUAL = "System Administration"
DESCRIPTION = "declarative outbound mail delivery"


def _commands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Top-level commands: name -> (parser, one-line help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _page(parser: argparse.ArgumentParser, name: str, summary: str, see_also: list[str]) -> str:
    text = str(Manpage(parser, {"manual_section": SECTION, "description": summary}))
    lines = text.splitlines()
    assert lines[0].startswith(".TH ") and lines[1] == ".SH NAME"
    lines[0] = f'.TH {name.upper()} "{SECTION}" "" "deliverd {__version__}" "{MANUAL}"'
    lines[2] = f"{name} \\- {summary}"
    lines += ["", ".SH SEE ALSO", ",\n".join(f".BR {page} ({SECTION})" for page in see_also)]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> page text, for deliverd(8) and each command."""
    os.environ["COLUMNS"] = "80"  # argparse wraps help text to the terminal's width
    parser = build_parser()
    commands = _commands(parser)
    names = [f"deliverd-{command}" for command in commands]
    out = {"deliverd.8": _page(parser, "deliverd", DESCRIPTION, [*names, "systemctl"])}
    for command, (sub, summary) in commands.items():
        name = f"deliverd-{command}"
        out[f"{name}.{SECTION}"] = _page(sub, name, summary, ["deliverd"])
    return out


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "man8"
    target.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (target / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
