"""RFC 8460 without I/O: result types, the JSON report, its message and the rua record."""

from __future__ import annotations

import email
import gzip
import json
from pathlib import Path

import pytest

from deliverd.config.convert import config_from_spec
from deliverd.core.outcomes import Hop, Reply, Route, SessionFailure, Stage, TransactionResult
from deliverd.delivery.tls_reporter import TlsReporter
from deliverd.dns.resolver import Resolver
from deliverd.queue.store import QueueStore
from deliverd.reports.notices import Notices
from deliverd.reports.tlsrpt import (
    failure_type,
    is_tls_required_no,
    report_json,
    report_message,
    rua_mailto,
    session_result,
)
from deliverd.spec.normalise import normalise
from deliverd.submission.cleanup import Intake

HOP = Hop("mx1.example.test", "127.0.0.75", 25, Route.DIRECT)


@pytest.mark.parametrize(("failure", "expected"), [
    (SessionFailure(Stage.STARTTLS, "TLS is required, but was not offered by x"),
     "starttls-not-supported"),
    (SessionFailure(Stage.STARTTLS, "", reply=Reply(454, "TLS not available")),
     "starttls-not-supported"),
    (SessionFailure(Stage.STARTTLS, "SSLCertVerificationError: certificate verify failed: "
                    "Hostname mismatch, certificate is not valid for 'mx1'"),
     "certificate-host-mismatch"),
    (SessionFailure(Stage.STARTTLS, "certificate verify failed: certificate has expired"),
     "certificate-expired"),
    (SessionFailure(Stage.STARTTLS, "certificate verify failed: self-signed certificate"),
     "certificate-not-trusted"),
    (SessionFailure(Stage.STARTTLS, "DANE: certificate matches no TLSA record (3 1 1 ab)"),
     "validation-failure"),
    (SessionFailure(Stage.STARTTLS, "DANE: TLSA lookup for mx failed, not delivering"),
     "dnssec-invalid"),
    (SessionFailure(Stage.CONNECT, "Connection refused"), None),
    (SessionFailure(Stage.RCPT, "", reply=Reply(550, "no such user")), None),
])
def test_failure_types(failure: SessionFailure, expected: str | None) -> None:
    assert failure_type(failure) == expected


def test_session_results() -> None:
    assert session_result(TransactionResult(HOP, tls="mta-sts")) == ""
    assert session_result(TransactionResult(HOP, tls="none")) == "starttls-not-supported"


def test_tls_required_no_is_read_from_the_header_section_only() -> None:
    assert is_tls_required_no(b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n")
    assert is_tls_required_no(b"tls-required:no\n\nbody\n")
    assert not is_tls_required_no(b"Subject: x\r\n\r\nTLS-Required: No\r\n")
    assert not is_tls_required_no(b"TLS-Required: Yes\r\n\r\n")


def test_report_json_and_message() -> None:
    policy = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 86400"
    rows = [("sts", policy, "", "", 3),
            ("sts", policy, "mx1.example.test", "certificate-expired", 2)]
    report = report_json(domain="example.test", day="2026-11-29", organization="relay.test",
                         contact="tlsrpt@relay.test", rows=rows)
    [entry] = report["policies"]
    assert entry["summary"] == {"total-successful-session-count": 3,
                                "total-failure-session-count": 2}
    assert entry["policy"]["mx-host"] == ["mx1.example.test"]
    assert entry["failure-details"][0]["result-type"] == "certificate-expired"
    data = report_message(report, domain="example.test", submitter="relay.test",
                          sender="tlsrpt@relay.test", recipients=["r@example.test"])
    assert b"\r\n" in data and b"\r\r" not in data
    parsed = email.message_from_bytes(data)
    assert parsed["TLS-Required"] == "No"
    assert parsed["TLS-Report-Domain"] == "example.test"
    assert parsed.get_param("report-type") == "tlsrpt"
    [part] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename() == "relay.test!example.test!1795910400!1795996799.json.gz"
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert json.loads(gzip.decompress(payload)) == report


@pytest.mark.parametrize(("records", "expected"), [
    (["v=TLSRPTv1; rua=mailto:a@example.test"], ["a@example.test"]),
    (["v=TLSRPTv1;rua=mailto:a@x.test,https://r.test/x,mailto:b@y.test"],
     ["a@x.test", "b@y.test"]),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], []),
    (["v=spf1 -all"], []),
])
def test_rua_mailto(records: list[str], expected: list[str]) -> None:
    assert rua_mailto(records) == expected


async def test_finished_days_are_dropped_unsent_when_reports_are_off(tmp_path: Path) -> None:
    cfg = config_from_spec(normalise({"version": 1, "host": {"name": "relay.test"},
                                      "queue": {"path": str(tmp_path)}}))
    assert not cfg.tls_reports.enabled
    store = await QueueStore.open(tmp_path)
    try:
        await store.count_tls_result(("example.test", "2026-11-29", "sts", "", ""), "p")
        await store.count_tls_result(("example.test", "2026-11-30", "sts", "", ""), "p")
        woken: list[bool] = []
        notices = Notices(Intake(store, lambda: cfg, lambda _qid, _source: woken.append(True)))
        reporter = TlsReporter(cfg, store, Resolver(["127.0.0.1:9"]), notices)
        assert await reporter.send_due(today="2026-11-30") == 0
        assert await store.tls_result_days("2026-12-01") == [("example.test", "2026-11-30")]
        assert not woken and not await store.list_messages()
    finally:
        await store.close()
