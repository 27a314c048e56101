"""The benchmarks still run end to end (tiny workloads; no timing is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import paths

REPO = paths.REPO
BENCH = REPO / "bench"

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def run_bench(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=240, check=False)


@pytest.mark.skipif(shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source")
                    .exists(), reason="Postfix's smtp-source is not installed")
def test_relay_bench_delivers_everything_and_prints_the_ratio_line(tmp_path: Path) -> None:
    done = run_bench("relay", "--messages", "300", "--sessions", "4", "--rounds", "1",
                     "--peers", "postfix", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio deliverd/postfix: ")
    float(last.rsplit(" ", 1)[1])
    (result,) = (tmp_path / "out").glob("relay-*.json")
    data = json.loads(result.read_text())
    assert {r["mta"] for r in data["runs"]} == {"deliverd", "postfix"}
    assert all(r["delivered"] == 300 and r["lost"] == 0 for r in data["runs"])
    assert (tmp_path / "out" / data["plot"]).read_bytes().startswith(b"\x89PNG")


CACHE = REPO / ".cache"
PEERS_READY = (CACHE / "haraka" / "node_modules" / ".bin" / "haraka").exists() and all(
    any((CACHE / "debs").glob(f"{p}_*.deb")) for p in ("exim4-daemon-light", "opensmtpd"))
SENDMAILS_READY = PEERS_READY and all(
    any((CACHE / "debs").glob(f"{p}_*.deb")) for p in ("dma", "msmtp"))


@pytest.mark.skipif(not PEERS_READY, reason="peers not fetched into .cache (run bench/relay once)")
def test_relay_bench_runs_exim_opensmtpd_and_haraka_beside_deliverd(tmp_path: Path) -> None:
    done = run_bench("relay", "--messages", "40", "--sessions", "2", "--rounds", "1",
                     "--peers", "exim,opensmtpd,haraka", "--out", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in lines] == [
        "ratio deliverd/exim", "ratio deliverd/opensmtpd", "ratio deliverd/haraka"]
    (result,) = (tmp_path / "out").glob("relay-*.json")
    data = json.loads(result.read_text())
    assert data["not_measured"] == {}
    assert all(r["delivered"] == 40 and r["lost"] == 0 for r in data["runs"])


@pytest.mark.skipif(not Path("/usr/sbin/smtp-sink").exists(), reason="Postfix is not installed")
def test_sendmail_bench_delivers_through_deliverd_and_postfix(tmp_path: Path) -> None:
    done = run_bench("sendmail", "-n", "4", "--mtas", "deliverd,postfix", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not measured" not in done.stdout
    assert done.stdout.count("deliverd ") >= 2 and done.stdout.count("postfix ") >= 2


@pytest.mark.skipif(not SENDMAILS_READY, reason="peers not fetched into .cache")
def test_sendmail_bench_runs_every_peers_sendmail(tmp_path: Path) -> None:
    done = run_bench("sendmail", "-n", "3", "--mtas", "exim,dma,msmtp,nullmailer,opensmtpd",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not measured" not in done.stdout
    for mta in ("exim", "dma", "msmtp", "nullmailer", "opensmtpd"):
        assert done.stdout.count(f"{mta} ") >= 2, done.stdout


def test_queue_scale_bench_writes_its_json(tmp_path: Path) -> None:
    done = run_bench("queue-scale", "--messages", "2000", "--out", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = (tmp_path / "out").glob("queue-scale-*.json")
    (entry,) = json.loads(result.read_text())["results"]
    assert entry["messages"] == 2000
    assert entry["ready_s"] > 0 and entry["rss_mb"] > 0
