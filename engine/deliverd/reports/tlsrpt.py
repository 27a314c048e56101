"""SMTP TLS reports (RFC 8460) without I/O: result types, the JSON report and its message.

``result_type`` names what went wrong with a session under a policy (or None: it succeeded),
``report_json`` builds the aggregate report of one policy domain and UTC day from the counts the
queue database kept, ``report_message`` wraps it as RFC 8460 §5.3 asks (gzip attachment in a
``multipart/report; report-type="tlsrpt"``, with ``TLS-Required: No`` from RFC 8689 so that the
report reaches a receiver whose TLS is broken, which is when it matters), and ``rua_mailto``
reads the ``_smtp._tls`` TXT record.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from deliverd.core.outcomes import SessionFailure, Stage, TransactionResult

# (policy type, policy text, MX host, result type or '' for success, session count)
ResultRow = tuple[str, str, str, str, int]

_CERT_ERRORS = (
    ("hostname mismatch", "certificate-host-mismatch"),
    ("doesn't match", "certificate-host-mismatch"),
    ("certificate has expired", "certificate-expired"),
    ("certificate is not yet valid", "certificate-expired"),
    ("self-signed", "certificate-not-trusted"),
    ("self signed", "certificate-not-trusted"),
    ("unable to get local issuer", "certificate-not-trusted"),
    ("certificate verify failed", "certificate-not-trusted"),
)


def is_tls_required_no(data: bytes) -> bool:
    """The message carries ``TLS-Required: No`` (RFC 8689) in its header section."""
    head = data[:65536].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return re.search(rb"(?im)^tls-required:[ \t]*no[ \t]*\r?$", head) is not None


def failure_type(failure: SessionFailure) -> str | None:
    """The RFC 8460 result type of a failed session, or None: TLS was never in question
    (the host could not be reached, or refused mail before STARTTLS)."""
    error = failure.error.lower()
    if failure.stage is not Stage.STARTTLS:
        return None
    if "tlsa lookup" in error:
        return "dnssec-invalid"
    if "dane:" in error:
        return "validation-failure"
    if "not offered" in error or failure.reply is not None:
        return "starttls-not-supported"
    for needle, kind in _CERT_ERRORS:
        if needle in error:
            return kind
    return "validation-failure"


def session_result(result: TransactionResult) -> str | None:
    """'' for a session that did TLS as the policy asked, a result type for one that did not,
    None for one that says nothing about TLS."""
    if result.failure is not None:
        return failure_type(result.failure)
    return "" if result.tls not in (None, "none") else "starttls-not-supported"


def report_json(
    *, domain: str, day: str, organization: str, contact: str, rows: Sequence[ResultRow]
) -> dict[str, Any]:
    """RFC 8460 §4.4: one report for ``domain`` and the UTC ``day`` (YYYY-MM-DD)."""
    grouped: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for row in rows:
        grouped[(row[0], row[1])].append(row)
    policies = []
    for (policy_type, policy_text), items in grouped.items():
        ok = sum(n for _, _, _, result, n in items if not result)
        failed = [(mx, result, n) for _, _, mx, result, n in items if result]
        policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
        if policy_text:
            policy["policy-string"] = policy_text.split("\n")
        if policy_type == "sts":  # RFC 8460 §4.4: mx-host is the policy's mx patterns
            policy["mx-host"] = [line[4:] for line in policy_text.split("\n")
                                 if line.startswith("mx: ")]
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(n for _, _, n in failed)},
        }
        if failed:
            entry["failure-details"] = [
                {"result-type": result, "receiving-mx-hostname": mx, "failed-session-count": n}
                for mx, result, n in failed
            ]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z",
                       "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": f"{day}.{domain}@{organization}",
        "policies": policies,
    }


def report_message(
    report: dict[str, Any], *, domain: str, submitter: str, sender: str,
    recipients: Sequence[str], now: datetime | None = None,
) -> bytes:
    """The report as mail (RFC 8460 §5.3)."""
    day = report["date-range"]["start-datetime"][:10]
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["Subject"] = (
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    )
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg.set_content(f"TLS report for {domain} on {day} from {submitter}.\n")
    begin = int(datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp())
    name = f"{submitter}!{domain}!{begin}!{begin + 86399}.json.gz"
    body = gzip.compress(json.dumps(report, indent=1).encode(), mtime=0)
    msg.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=name)
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    return msg.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def rua_mailto(records: Sequence[str]) -> list[str]:
    """mailto: addresses of the one ``v=TLSRPTv1`` record (RFC 8460 §3), https ones ignored."""
    found = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []
    addresses: list[str] = []
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            for uri in value.split(","):
                uri = uri.strip()
                if uri.lower().startswith("mailto:") and "@" in uri:
                    addresses.append(uri[7:].split("?")[0])
    return addresses
