"""A real Prometheus server (Debian's ``prometheus`` package) on loopback, and ``promtool``.

``start_prometheus`` writes its own config (one job scraping the given targets every second,
optional rule files, evaluated every second), its own TSDB directory, and starts the binary on an
ephemeral loopback port; the system service of the package is never touched. ``query`` runs
PromQL over the HTTP API, as Grafana does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deliverd_lab.common import LabError, terminate, wait_for_port

SCRAPE_INTERVAL = "1s"


class PrometheusMissing(LabError):
    """The ``prometheus`` / ``promtool`` binaries are not installed."""


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PrometheusMissing(f"{name} is not installed (Debian package prometheus)")
    return found


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``promtool`` with ``args``; the caller checks the exit code and output."""
    return subprocess.run(
        [binary("promtool"), *args], input=stdin, capture_output=True, timeout=120, check=False
    )


@dataclass
class PrometheusServer:
    address: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def api(self, path: str, **params: str) -> object:
        """GET ``/api/v1/<path>``; the ``data`` member of a successful answer."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}?{query}"  # always http://loopback
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise LabError(f"Prometheus API {path} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, object]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        result = data["result"]
        if data.get("resultType") == "scalar":
            return [{"metric": {}, "value": result}]
        assert isinstance(result, list)
        return result

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, None when the result is empty."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise LabError(f"{expr} gave {len(result)} series, expected one: {result}")
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def targets_up(self) -> bool:
        data = self.api("targets")
        assert isinstance(data, dict)
        active = data["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            terminate(self.proc.pid)
            self.proc.wait(10)


def write_config(
    workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Path:
    lines = [
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  evaluation_interval: {SCRAPE_INTERVAL}",
        "scrape_configs:",
        "  - job_name: deliverd",
        "    static_configs:",
        f"      - targets: {json.dumps(list(targets))}",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {json.dumps(str(path))}" for path in rule_files]
    path = workdir / "prometheus.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_prometheus(
    workdir: Path,
    targets: Sequence[str],
    port: int,
    *,
    address: str = "127.0.0.1",
    rule_files: Sequence[Path] = (),
    timeout: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus scraping ``targets`` (``host:port``); ``LabError`` if it does not come
    up, ``PrometheusMissing`` without the binary."""
    exe = binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, targets, rule_files)
    check = promtool("check", "config", str(config))
    if check.returncode != 0:
        raise LabError(f"promtool check config failed: {check.stderr.decode(errors='replace')}")
    log = (workdir / "prometheus.log").open("ab")
    proc = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address={address}:{port}", "--log.level=warn"],
        stdout=log, stderr=log, cwd=workdir,
    )
    log.close()
    server = PrometheusServer(address, port, workdir, proc)
    try:
        deadline = time.monotonic() + timeout
        wait_for_port(address, port, timeout, "prometheus")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"prometheus exited {proc.returncode}:\n{server.log_text()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:  # noqa: S310
                    if reply.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.1)
        raise LabError(f"prometheus not ready within {timeout:.0f}s:\n{server.log_text()}")
    except BaseException:
        server.stop()
        raise
