"""Mail sent continuously through one host's engine while the fleet changes (DKIM rotation).

    python sender.py start --pid-file P --log L --netns dlv-h1 -- --server 198.51.100.11:2525 \\
        --from app@dlv-h1.lab.test --to rotate@direct.lab.test --prefix rotate-dlv-h1
    python sender.py stop --pid-file P          # safe twice

``start`` runs ``run`` in the background inside the host's network namespace (so the engine
sees the host's own address, which it relays for) and returns. ``run`` submits one message
over SMTP every ``--interval`` seconds until SIGTERM; each message the engine accepted (250
after DATA) is one JSON line in the log (its Message-ID), each refusal or connection failure a
line with ``"accepted": false``: only accepted mail is the engine's to deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    host, _, port = args.server.rpartition(":")
    number = 0
    with args.log.open("a") as log:
        while not stopping.is_set():
            number += 1
            message = EmailMessage()
            message["From"] = args.sender
            message["To"] = args.to
            message["Subject"] = f"{args.prefix} {number}"
            message["Date"] = formatdate(localtime=False)
            message["Message-ID"] = f"<{args.prefix}-{number}-{time.time_ns()}@lab.test>"
            message.set_content(f"message {number} sent while the fleet changes\n")
            entry: dict[str, object] = {"message_id": message["Message-ID"], "time": time.time()}
            try:
                with smtplib.SMTP(host, int(port), timeout=10) as smtp:
                    smtp.send_message(message)
                entry["accepted"] = True
            except (OSError, smtplib.SMTPException) as exc:
                entry.update(accepted=False, error=str(exc))
            log.write(json.dumps(entry) + "\n")
            log.flush()
            stopping.wait(args.interval)
    return 0


def start(args: argparse.Namespace) -> int:
    argv = [sys.executable, str(Path(__file__).resolve()), "run", *args.run_args]
    if args.netns:
        argv = ["ip", "netns", "exec", args.netns, *argv]
    with open(os.devnull, "rb") as null, args.log.with_suffix(".stderr").open("ab") as err:
        process = subprocess.Popen([*argv, "--log", str(args.log)], stdin=null, stdout=err,
                                   stderr=err, start_new_session=True)
    args.pid_file.write_text(f"{process.pid}\n")
    time.sleep(0.5)
    if process.poll() is not None:
        print(f"the sender exited at once: {args.log.with_suffix('.stderr').read_text()}",
              file=sys.stderr)
        return 1
    return 0


def stop(args: argparse.Namespace) -> int:
    try:
        pid = int(args.pid_file.read_text())
    except (OSError, ValueError):
        return 0
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for _ in range(100):  # the sender finishes the message it is sending (at most 10 s)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(pid, signal.SIGKILL)
    args.pid_file.unlink(missing_ok=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run")
    r.add_argument("--server", required=True, metavar="ADDRESS:PORT")
    r.add_argument("--from", dest="sender", required=True)
    r.add_argument("--to", required=True)
    r.add_argument("--prefix", required=True)
    r.add_argument("--interval", type=float, default=0.5)
    r.add_argument("--log", type=Path, required=True)
    s = sub.add_parser("start")
    s.add_argument("--pid-file", type=Path, required=True)
    s.add_argument("--log", type=Path, required=True)
    s.add_argument("--netns", default=None)
    s.add_argument("run_args", nargs=argparse.REMAINDER)
    t = sub.add_parser("stop")
    t.add_argument("--pid-file", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "start":
        args.run_args = [a for a in args.run_args if a != "--"]
    return {"run": run, "start": start, "stop": stop}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
