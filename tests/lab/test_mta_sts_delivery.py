"""MTA-STS (RFC 8461) end to end: dnsmasq publishes the TXT records and MX hosts, a real HTTPS
server (``http.server`` with a trustme certificate on port 443 of its own loopback address)
serves the policies, aiosmtpd sinks are the MX hosts. The engine trusts the trustme CA through
OpenSSL's standard ``SSL_CERT_FILE``, nothing else."""

from __future__ import annotations

import email
import gzip
import json
import os
import sqlite3
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.fixtures.dns import DnsServer
from tests.fixtures.engine import Engine
from tests.fixtures.smtp_sink import Script, Sink, TlsCA, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDER = "alice@sender.test"
POLICY_HOST = "127.0.0.74"
MX_LISTED = "127.0.0.75"  # mx1.<domain>: in every policy
MX_UNLISTED = "127.0.0.76"  # mx0.<domain>: preferred by DNS, in no policy
DOMAINS = ("enforce.test", "testing.test", "cached.test", "none.test")
MX_NAMES = tuple(f"mx{i}.{d}" for d in DOMAINS for i in (0, 1))

ZONE = (*(line for d in DOMAINS for line in (
    f"mx-host={d},mx0.{d},10",
    f"mx-host={d},mx1.{d},20",
    f"host-record=mx0.{d},{MX_UNLISTED}",
    f"host-record=mx1.{d},{MX_LISTED}",
    f"host-record=mta-sts.{d},{POLICY_HOST}",
    f'txt-record=_mta-sts.{d},"v=STSv1; id=1"',
) if not (d == "none.test" and line.startswith("txt-record"))),
    # reports about enforce.test go to enforce.test itself, under its own enforced policy
    'txt-record=_smtp._tls.enforce.test,"v=TLSRPTv1; rua=mailto:tlsrpt@enforce.test"',
)


def policy(mode: str, domain: str) -> str:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: mx1.{domain}\r\nmax_age: 86400\r\n"


class PolicyServer:
    """HTTPS on POLICY_HOST:443 serving ``policies[host]`` as text/plain."""

    def __init__(self, tls: TlsCA) -> None:
        self.policies: dict[str, str] = {}
        self.requests: list[str] = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                server_self.requests.append(f"{host}{self.path}")
                text = server_self.policies.get(host)
                if text is None or self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((POLICY_HOST, 443), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.server_cert.configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def good_tls(ca: trustme.CA) -> TlsCA:
    return TlsCA(ca, ca.issue_cert(*MX_NAMES, *(f"mta-sts.{d}" for d in DOMAINS)))


@pytest.fixture
def trust_store(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine (a subprocess inheriting the environment) trusts the test CA only."""
    bundle = tmp_path / "trust.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))


@pytest.fixture
def policy_server(good_tls: TlsCA) -> Iterator[PolicyServer]:
    if os.geteuid() != 0:
        pytest.skip("the MTA-STS policy host listens on port 443 (needs root)")
    server = PolicyServer(good_tls)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def zone(session_dns_server_factory: Callable[..., DnsServer]) -> DnsServer:
    return session_dns_server_factory(ZONE)


@pytest.fixture
def mx_port() -> int:
    return free_port([MX_LISTED, MX_UNLISTED])


@pytest.fixture
def sinks(mx_port: int) -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def start(address: str, tls: TlsCA | None, **script: Any) -> Sink:
        sink = Sink(address, mx_port, Script(starttls=tls is not None, **script), tls).start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def start(engine_factory: Callable[..., Engine], zone: DnsServer, mx_port: int,
          trust_store: None) -> Callable[..., Engine]:
    def make(tls_reports: dict[str, Any] | None = None, **direct: Any) -> Engine:
        spec: dict[str, Any] = {"routing": {"direct": {"port": mx_port, **direct}}}
        if tls_reports is not None:
            spec["tls_reports"] = tls_reports
        return engine_factory(spec, nameserver=zone.nameserver)
    return make


def test_enforce_skips_an_mx_the_policy_does_not_list(
        start: Callable[..., Engine], sinks: Callable[..., Sink], good_tls: TlsCA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.enforce.test"] = policy("enforce", "enforce.test")
    unlisted, listed = sinks(MX_UNLISTED, good_tls), sinks(MX_LISTED, good_tls)
    engine = start()
    engine.submit(SENDER, ["bob@enforce.test"])
    record = engine.wait_status("bob@enforce.test", "sent")
    assert record["tls"] == "mta-sts"
    assert record["relay"].startswith("mx1.enforce.test[")
    assert listed.messages and not unlisted.sessions
    assert policy_server.requests == ["mta-sts.enforce.test/.well-known/mta-sts.txt"]


def test_without_mta_sts_the_preferred_unlisted_mx_gets_the_mail(
        start: Callable[..., Engine], sinks: Callable[..., Sink], good_tls: TlsCA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.enforce.test"] = policy("enforce", "enforce.test")
    unlisted = sinks(MX_UNLISTED, good_tls)
    engine = start(mta_sts=False)
    engine.submit(SENDER, ["bob@enforce.test"])
    assert engine.wait_status("bob@enforce.test", "sent")["tls"] == "encrypted"
    assert unlisted.messages
    assert not policy_server.requests


def test_enforce_defers_a_certificate_for_another_name(
        start: Callable[..., Engine], sinks: Callable[..., Sink], ca: trustme.CA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.enforce.test"] = policy("enforce", "enforce.test")
    listed = sinks(MX_LISTED, TlsCA(ca, ca.issue_cert("somewhere-else.test")))
    engine = start()
    engine.submit(SENDER, ["bob@enforce.test"])
    record = engine.wait_status("bob@enforce.test", "deferred")
    assert record["dsn"].startswith("4.")
    assert "certificate" in record["reply"].lower()
    assert not listed.messages


def test_enforce_defers_when_starttls_is_stripped(
        start: Callable[..., Engine], sinks: Callable[..., Sink],
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.enforce.test"] = policy("enforce", "enforce.test")
    listed = sinks(MX_LISTED, None)  # no STARTTLS offered, as after a downgrade attack
    engine = start()
    engine.submit(SENDER, ["bob@enforce.test"])
    record = engine.wait_status("bob@enforce.test", "deferred")
    assert "TLS is required" in record["reply"]
    assert not listed.messages


def test_testing_mode_delivers_to_any_mx_without_verification(
        start: Callable[..., Engine], sinks: Callable[..., Sink], ca: trustme.CA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.testing.test"] = policy("testing", "testing.test")
    unlisted = sinks(MX_UNLISTED, TlsCA(ca, ca.issue_cert("somewhere-else.test")))
    engine = start()
    engine.submit(SENDER, ["bob@testing.test"])
    assert engine.wait_status("bob@testing.test", "sent")["tls"] == "encrypted"
    assert unlisted.messages
    assert policy_server.requests == ["mta-sts.testing.test/.well-known/mta-sts.txt"]


def test_policy_is_cached_across_a_restart_with_the_policy_host_down(
        start: Callable[..., Engine], sinks: Callable[..., Sink], good_tls: TlsCA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.cached.test"] = policy("enforce", "cached.test")
    unlisted, listed = sinks(MX_UNLISTED, good_tls), sinks(MX_LISTED, good_tls)
    engine = start()
    engine.submit(SENDER, ["bob@cached.test"])
    engine.wait_status("bob@cached.test", "sent")
    engine.stop()
    policy_server.stop()
    policy_server.policies.clear()
    engine.start()
    engine.submit(SENDER, ["carol@cached.test"])
    assert engine.wait_status("carol@cached.test", "sent")["tls"] == "mta-sts"
    assert len(listed.messages) == 2 and not unlisted.sessions
    assert len(policy_server.requests) == 1


def test_no_txt_record_means_no_policy(
        start: Callable[..., Engine], sinks: Callable[..., Sink], good_tls: TlsCA,
        policy_server: PolicyServer) -> None:
    policy_server.policies["mta-sts.none.test"] = policy("enforce", "none.test")
    unlisted = sinks(MX_UNLISTED, good_tls)
    engine = start()
    engine.submit(SENDER, ["bob@none.test"])
    assert engine.wait_status("bob@none.test", "sent")["tls"] == "encrypted"
    assert unlisted.messages and not policy_server.requests


def _report_of(message: bytes) -> dict[str, Any]:
    parsed = email.message_from_bytes(message)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Required"] == "No"
    parts = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert len(parts) == 1
    payload = parts[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    report: dict[str, Any] = json.loads(gzip.decompress(payload))
    return report


def test_tls_report_for_a_day_with_one_success_and_one_failure_reaches_the_rua(
        start: Callable[..., Engine], sinks: Callable[..., Sink], good_tls: TlsCA,
        ca: trustme.CA, policy_server: PolicyServer, mx_port: int) -> None:
    policy_server.policies["mta-sts.enforce.test"] = policy("enforce", "enforce.test")
    good = sinks(MX_LISTED, good_tls)
    engine = start(tls_reports={"enabled": True, "from": "tlsrpt@deliverd.test"})
    engine.submit(SENDER, ["bob@enforce.test"])
    engine.wait_status("bob@enforce.test", "sent")
    good.stop()
    wrong = sinks(MX_LISTED, TlsCA(ca, ca.issue_cert("somewhere-else.test")))
    engine.submit(SENDER, ["carol@enforce.test"])
    engine.wait_status("carol@enforce.test", "deferred")
    engine.stop()
    failures = len([r for r in engine.attempts("carol@enforce.test")
                    if r["status"] == "deferred"])
    # The day is over: move the counted sessions to yesterday, as midnight UTC would.
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    with sqlite3.connect(Path(engine.spec["queue"]["path"]) / "queue.db") as db:
        assert db.execute("UPDATE tls_results SET day = ?", (yesterday,)).rowcount >= 2
    engine.start()
    # TLS-Required: No lets the report through the certificate that the policy refuses
    engine.wait_status("tlsrpt@enforce.test", "sent")
    engine.stop()
    [message] = wrong.messages
    assert message.rcpt_tos == ("tlsrpt@enforce.test",)
    report = _report_of(message.data)
    assert report["date-range"]["start-datetime"] == f"{yesterday}T00:00:00Z"
    assert report["contact-info"] == "tlsrpt@deliverd.test"
    [entry] = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["policy-domain"] == "enforce.test"
    assert entry["policy"]["mx-host"] == ["mx1.enforce.test"]
    assert "mode: enforce" in entry["policy"]["policy-string"]
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": failures}
    assert entry["failure-details"] == [{
        "result-type": "certificate-host-mismatch",
        "receiving-mx-hostname": "mx1.enforce.test",
        "failed-session-count": failures,
    }]
    # The report's own delivery is not counted: today has only carol's retries, no success.
    retries = len([r for r in engine.attempts("carol@enforce.test")
                   if r["status"] == "deferred"]) - failures
    with sqlite3.connect(Path(engine.spec["queue"]["path"]) / "queue.db") as db:
        today = dict(db.execute("SELECT result, SUM(count) FROM tls_results GROUP BY result"))
    assert today == ({"certificate-host-mismatch": retries} if retries else {})
