"""The README's demo command keeps working: it shows one message sent, one deferred, one bounced
and the bounce that came back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_demo_shows_delivered_deferred_and_bounced_mail() -> None:
    result = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "to=<bob@example.net>" in out and "status=sent" in out
    assert "to=<carol@busy.example>" in out and "status=deferred" in out
    assert "to=<dave@gone.example>" in out and "status=bounced" in out
    assert "Status: 5.1.1" in out and "Action: failed" in out
    for example in ("direct.yml", "smarthost.yml", "fallback.yml"):
        assert example in out
