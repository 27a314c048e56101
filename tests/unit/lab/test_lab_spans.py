"""The lab's reading of the queue times Exim and OpenSMTPD log (bench/relay's latency column)."""

from __future__ import annotations

import pytest

from deliverd_lab.unpacked import span_seconds


@pytest.mark.parametrize(("logged", "seconds"), [
    ("0.045s", 0.045),  # Exim QT= with +millisec
    ("1.5s", 1.5),
    ("2m3s", 123.0),
    ("1h2m", 3720.0),
    ("1d2h", 93600.0),  # OpenSMTPD delay=
    ("0s", 0.0),
])
def test_span_seconds_reads_exim_and_opensmtpd_durations(logged: str, seconds: float) -> None:
    assert span_seconds(logged) == pytest.approx(seconds)
