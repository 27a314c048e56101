"""The README's demo command keeps working: it shows one message sent, one deferred, one bounced
and the bounce that came back; as root it deploys the two-host demo fleet with the role and shows
a message delivered through each host, by its own route."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures import paths

REPO = paths.REPO


@pytest.mark.integration
@pytest.mark.slow
def test_demo_shows_delivered_deferred_and_bounced_mail_and_deploys_the_fleet() -> None:
    result = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py")],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "to=<bob@example.net>" in out and "status=sent" in out
    assert "to=<carol@busy.example>" in out and "status=deferred" in out
    assert "to=<dave@gone.example>" in out and "status=bounced" in out
    assert "Status: 5.1.1" in out and "Action: failed" in out
    for example in ("direct.yml", "smarthost.yml", "fallback.yml"):
        assert example in out
    if os.geteuid() == 0:
        assert "to=<relay-a@example.net>" in out and "route=direct" in out
        assert "to=<relay-b@example.net>" in out and "route=smarthost" in out
        assert "the smart host sink received: [('relay-b@example.net',)]" in out
        assert out.count("failed=0") == 4  # deploy and removal, two hosts each
