"""The lab's SMTP sinks: aiosmtpd servers that accept every message and record it.

One process serves every sink given as ``NAME=ADDRESS:PORT``; each sink appends one JSON line
per received message to ``<dir>/<NAME>/messages.jsonl`` (peer, envelope, Subject, Message-ID)
and keeps the raw message beside it, so a verify step can tell which route a message took by
which sink received it. With ``--dkim-dns ADDRESS`` every message's DKIM signatures are
verified as it arrives (dkimpy, asking the lab's DNS at ADDRESS, as a receiving MTA would) and
the record says, per signature, its domain, selector and whether it verified. ``--lose NAME=TEXT`` makes sink NAME answer 250 to a message that
contains TEXT and keep nothing of it: mail lost after it was accepted, as a broken relay does.
Runs in the foreground until SIGTERM/SIGINT.

    python sink.py --dir SINKS_DIR --pid-file PID [--lose NAME=TEXT] [--dkim-dns ADDRESS] \
        mx=198.51.100.21:25 ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.resolver
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class DkimVerifier:
    """Verify every DKIM-Signature of a message against the lab's DNS. A lookup that fails
    for a moment (the lab's DNS restarts when records are published) is asked again, as a
    receiving MTA would defer and retry rather than call the signature broken."""

    def __init__(self, nameserver: str) -> None:
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = [nameserver]

    def lookup(self, name: bytes, timeout: int = 5) -> bytes | None:
        for _ in range(20):
            try:
                answer = self.resolver.resolve(name.decode("ascii").rstrip("."), "TXT",
                                               lifetime=2.0)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return None
            except dns.exception.DNSException:
                time.sleep(0.25)
                continue
            return b"".join(answer[0].strings)  # type: ignore[attr-defined]
        return None

    def results(self, message: bytes) -> list[dict[str, Any]]:
        checker = dkim.DKIM(message)
        headers = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
        out: list[dict[str, Any]] = []
        for index, value in enumerate(headers):
            found = dict(dkim.util.parse_tag_value(value))
            entry: dict[str, Any] = {"d": found.get(b"d", b"").decode(),
                                     "s": found.get(b"s", b"").decode(),
                                     "a": found.get(b"a", b"").decode()}
            try:
                entry["ok"] = bool(dkim.DKIM(message).verify(idx=index, dnsfunc=self.lookup))
            except dkim.DKIMException as exc:
                entry.update(ok=False, error=str(exc))
            out.append(entry)
        return out


class Recorder:
    """aiosmtpd handler: store the message, then answer 250."""

    def __init__(self, directory: Path, lose: bytes | None = None,
                 verifier: DkimVerifier | None = None) -> None:
        self.directory = directory
        self.lose = lose
        self.verifier = verifier
        self.lock = threading.Lock()
        self.count = len(list(directory.glob("*.eml")))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if self.lose is not None and self.lose in content:
            return "250 2.0.0 Ok: accepted (and lost: this lab sink loses such mail)"
        headers = BytesHeaderParser().parsebytes(content)
        signatures = self.verifier.results(content) if self.verifier is not None else None
        with self.lock:
            self.count += 1
            name = f"{self.count:06d}.eml"
            (self.directory / name).write_bytes(content)
            record: dict[str, Any] = {
                "time": time.time(),
                "file": name,
                "peer": session.peer[0] if isinstance(session.peer, tuple) else str(session.peer),
                "helo": session.host_name,
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "subject": headers.get("Subject", ""),
                "message_id": headers.get("Message-ID", "").strip(),
            }
            if signatures is not None:
                record["dkim"] = signatures
            with (self.directory / "messages.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
        return "250 2.0.0 Ok: stored by the lab sink"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--lose", action="append", default=[], metavar="NAME=TEXT")
    parser.add_argument("--dkim-dns", metavar="ADDRESS", default=None,
                        help="verify DKIM signatures, asking the DNS server at ADDRESS")
    parser.add_argument("sinks", nargs="+", metavar="NAME=ADDRESS:PORT")
    args = parser.parse_args()
    losing = dict(item.split("=", 1) for item in args.lose)
    controllers = []
    for item in args.sinks:
        name, _, where = item.partition("=")
        address, _, port = where.rpartition(":")
        directory = args.dir / name
        directory.mkdir(parents=True, exist_ok=True)
        controller = Controller(
            Recorder(directory, losing[name].encode() if name in losing else None,
                     DkimVerifier(args.dkim_dns) if args.dkim_dns else None),
            hostname=address, port=int(port),
            server_hostname=f"{name}.sink.lab.test", ready_timeout=10,
        )
        controller.start()
        controllers.append(controller)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    args.pid_file.write_text(f"{os.getpid()}\n")
    try:
        stopping.wait()
    finally:
        for controller in controllers:
            controller.stop()
        args.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
