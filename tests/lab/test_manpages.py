"""The manual pages: made from the CLI's own parser, committed up to date, installed by the wheel,
and what systemd's Documentation=man:deliverd(8) check accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deliverd.cli.main import build_parser
from tests.fixtures import paths

REPO = paths.REPO
PAGES = REPO / "man" / "man8"
COMMANDS = ("validate", "render", "check-config", "run", "queue", "send", "probe", "dkim")


def test_committed_pages_match_the_parser(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "man" / "generate.py"), str(tmp_path)],
                   check=True, timeout=60)
    made = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text(encoding="utf-8") for p in PAGES.iterdir()}
    assert made == committed, "man/man8 is out of date: run make man"


def test_there_is_a_page_for_deliverd_and_each_command() -> None:
    names = {p.name for p in PAGES.iterdir()}
    assert names == {"deliverd.8", *(f"deliverd-{c}.8" for c in COMMANDS)}
    # Every option of a command is in its page (the page follows the parser, not a copy).
    run_page = (PAGES / "deliverd-run.8").read_text(encoding="utf-8")
    for option in ("--config", "--secrets", "--log-format", "--stop-grace", "--daemonize"):
        assert option.replace("-", "\\-") in run_page, option
    assert build_parser().prog == "deliverd"


@pytest.mark.skipif(shutil.which("man") is None, reason="man(1) is not installed")
def test_pages_render_with_man() -> None:
    for page in PAGES.iterdir():
        shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                               env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_STDERR": "1"},
                               timeout=60, check=False)
        assert shown.returncode == 0, shown.stderr
        assert "NAME" in shown.stdout and page.stem in shown.stdout
        assert not shown.stderr, shown.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("man") is None,
                    reason="systemd-analyze and man(1) are needed")
def test_systemd_analyze_verify_finds_the_documentation_page(tmp_path: Path) -> None:
    unit = tmp_path / "deliverd-doc.service"
    unit.write_text("[Unit]\nDescription=deliverd\nDocumentation=man:deliverd(8)\n"
                    f"[Service]\nType=notify\nExecStart={Path(sys.executable).parent}/deliverd"
                    " run\n", encoding="utf-8")
    man_root = tmp_path / "man"
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    missing = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                             text=True, env={**env, "MANPATH": str(man_root)}, timeout=60,
                             check=False)
    assert missing.returncode != 0 and "deliverd(8)" in missing.stderr
    shutil.copytree(PAGES, man_root / "man8")
    found = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, env={**env, "MANPATH": str(man_root)}, timeout=60,
                           check=False)
    assert found.returncode == 0, found.stderr
