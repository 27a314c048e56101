"""The lab's SMTP sinks: aiosmtpd servers that accept every message and record it.

One process serves every sink given as ``NAME=ADDRESS:PORT``; each sink appends one JSON line
per received message to ``<dir>/<NAME>/messages.jsonl`` (peer, envelope, Subject, Message-ID)
and keeps the raw message beside it, so a verify step can tell which route a message took by
which sink received it. ``--lose NAME=TEXT`` makes sink NAME answer 250 to a message that
contains TEXT and keep nothing of it: mail lost after it was accepted, as a broken relay does.
Runs in the foreground until SIGTERM/SIGINT.

    python sink.py --dir SINKS_DIR --pid-file PID [--lose NAME=TEXT] mx=198.51.100.21:25 ...
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

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Recorder:
    """aiosmtpd handler: store the message, then answer 250."""

    def __init__(self, directory: Path, lose: bytes | None = None) -> None:
        self.directory = directory
        self.lose = lose
        self.lock = threading.Lock()
        self.count = len(list(directory.glob("*.eml")))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if self.lose is not None and self.lose in content:
            return "250 2.0.0 Ok: accepted (and lost: this lab sink loses such mail)"
        headers = BytesHeaderParser().parsebytes(content)
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
            with (self.directory / "messages.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
        return "250 2.0.0 Ok: stored by the lab sink"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--lose", action="append", default=[], metavar="NAME=TEXT")
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
            Recorder(directory, losing[name].encode() if name in losing else None),
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
