"""The verify step's evidence readers: which route a message took, read from the servers' files.

    labcheck.py received --sinks DIR --sink NAME --message-id ID [--timeout S]
        wait until sink NAME recorded the message, and check that no other sink did
    labcheck.py arrived --sinks DIR MESSAGE_ID
        some sink has recorded the message now (no waiting: the caller retries)
    labcheck.py sasl --maillog FILE --message-id ID --user USER
        Postfix accepted that message from a client authenticated as USER
    labcheck.py pop-before-sasl --dovecot-log FILE --pop-user P --sasl-user U [--window S]
        every SMTP AUTH of U (Dovecot answers Postfix's SASL requests) came at most S seconds
        after a POP3 login of P, and there was at least one
    labcheck.py dkim --sinks DIR --sent LOG... [--selector S...] [--timeout S]
        every message a sender logged as accepted (sender.py) reached a sink, signed, and every
        signature verified there against the lab's DNS; each sender's mail carried every
        selector S (mail kept flowing across the switch)

Exit 0 and a JSON line on success; exit 1 and the reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any


class CheckFailed(Exception):
    pass


def _records(sink_dir: Path) -> list[dict[str, Any]]:
    path = sink_dir / "messages.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def received(sinks: Path, sink: str, message_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in _records(sinks / sink) if r["message_id"] == message_id]
        if found:
            break
        if time.monotonic() > deadline:
            elsewhere = [d.name for d in sinks.iterdir() if d.is_dir()
                         and any(r["message_id"] == message_id for r in _records(d))]
            raise CheckFailed(f"{message_id} did not reach sink {sink} within {timeout:.0f}s"
                              f" (found in: {elsewhere or 'no sink'})")
        time.sleep(0.5)
    others = [d.name for d in sinks.iterdir() if d.is_dir() and d.name != sink
              and any(r["message_id"] == message_id for r in _records(d))]
    if others:
        raise CheckFailed(f"{message_id} reached {sink} but also {others}")
    return found[0]


def arrived(sinks: Path, message_id: str) -> dict[str, Any]:
    for sink in sorted(p for p in sinks.iterdir() if p.is_dir()):
        found = [r for r in _records(sink) if r["message_id"] == message_id]
        if found:
            return {"sink": sink.name, **found[0]}
    raise CheckFailed(f"no sink has {message_id} yet")


def sasl_user(maillog: Path, message_id: str, user: str) -> dict[str, Any]:
    text = maillog.read_text(errors="replace")
    queued = re.search(rf"\b([0-9A-F]+): message-id={re.escape(message_id)}", text)
    if queued is None:
        raise CheckFailed(f"{maillog} has no message-id={message_id}")
    queue_id = queued.group(1)
    client = re.search(rf"\b{queue_id}: client=([^,\n]+), sasl_method=([A-Z0-9-]+), "
                       rf"sasl_username=([^\s,]+)", text)
    if client is None:
        raise CheckFailed(f"{maillog}: message {queue_id} came without SASL authentication")
    if client.group(3) != user:
        raise CheckFailed(f"{maillog}: message {queue_id} authenticated as {client.group(3)},"
                          f" not {user}")
    return {"queue_id": queue_id, "client": client.group(1), "sasl_username": user}


# Dovecot's log_timestamp in the lab (deliverd_lab.dovecot.LOG_TIME_FORMAT).
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")
# The engine logs in again only once its last login is older than valid_for (1 s in the lab),
# and deliveries that start together share one login: an AUTH follows some login by up to
# valid_for plus the session's connect, STARTTLS and EHLO, never by more than this.
POP_WINDOW = 10.0


def pop_before_sasl(dovecot_log: Path, pop_user: str, sasl_user: str,
                    window: float = POP_WINDOW) -> dict[str, Any]:
    pop = re.compile(rf"pop3-login: (?:Info: )?Login: user=<{re.escape(pop_user)}>")
    auth = re.compile(rf"client passdb out: OK\t\d+\tuser={re.escape(sasl_user)}(?:\t|$)")
    pops = auths = 0
    last_pop: datetime | None = None
    for number, line in enumerate(dovecot_log.read_text(errors="replace").splitlines(), 1):
        stamp = _STAMP.match(line)
        when = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S") if stamp else None
        if pop.search(line):
            pops += 1
            last_pop = when
        elif auth.search(line):
            auths += 1
            if last_pop is None or when is None:
                raise CheckFailed(f"{dovecot_log}:{number}: SMTP AUTH of {sasl_user} without a"
                                  f" POP3 login of {pop_user} before it")
            if (when - last_pop).total_seconds() > window:
                raise CheckFailed(f"{dovecot_log}:{number}: SMTP AUTH of {sasl_user}"
                                  f" {(when - last_pop).total_seconds():.0f}s after the last"
                                  f" POP3 login of {pop_user} (more than {window:.0f}s)")
    if auths == 0:
        raise CheckFailed(f"{dovecot_log}: no SMTP AUTH of {sasl_user} at all")
    return {"pop_logins": pops, "smtp_auths": auths}


def _all_records(sinks: Path) -> dict[str, dict[str, Any]]:
    return {r["message_id"]: r for d in sorted(sinks.iterdir()) if d.is_dir()
            for r in _records(d)}


def dkim_signed(sinks: Path, sent: list[Path], selectors: list[str],
                timeout: float) -> dict[str, Any]:
    accepted = {log: [e["message_id"] for e in map(json.loads, log.read_text().splitlines())
                      if e["accepted"]] for log in sent}
    wanted = {mid for ids in accepted.values() for mid in ids}
    deadline = time.monotonic() + timeout
    while True:
        found = _all_records(sinks)
        missing = sorted(wanted - set(found))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if missing:
        raise CheckFailed(f"{len(missing)} of {len(wanted)} accepted messages never reached a"
                          f" sink within {timeout:.0f}s, e.g. {missing[:3]}")
    summary: dict[str, Any] = {}
    for log, ids in accepted.items():
        if not ids:
            raise CheckFailed(f"{log}: the engine accepted no message at all")
        seen: dict[str, int] = {}
        for mid in ids:
            signatures = found[mid].get("dkim")
            if signatures is None:
                raise CheckFailed(f"{mid}: the sink did not check DKIM (no --dkim-dns)")
            if not signatures:
                raise CheckFailed(f"{mid} arrived unsigned")
            failing = [sig for sig in signatures if not sig["ok"]]
            if failing:
                raise CheckFailed(f"{mid}: signature {failing} does not verify")
            for sig in signatures:
                seen[sig["s"]] = seen.get(sig["s"], 0) + 1
        absent = [s for s in selectors if s not in seen]
        if absent:
            raise CheckFailed(f"{log}: no message signed with {absent} (seen: {seen})")
        summary[log.name] = {"accepted": len(ids), "selectors": seen}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description="lab evidence checks")
    sub = parser.add_subparsers(dest="check", required=True)
    r = sub.add_parser("received")
    r.add_argument("--sinks", type=Path, required=True)
    r.add_argument("--sink", required=True)
    r.add_argument("--message-id", required=True)
    r.add_argument("--timeout", type=float, default=60.0)
    a = sub.add_parser("arrived")
    a.add_argument("--sinks", type=Path, required=True)
    a.add_argument("message_id")
    s = sub.add_parser("sasl")
    s.add_argument("--maillog", type=Path, required=True)
    s.add_argument("--message-id", required=True)
    s.add_argument("--user", required=True)
    p = sub.add_parser("pop-before-sasl")
    p.add_argument("--dovecot-log", type=Path, required=True)
    p.add_argument("--pop-user", required=True)
    p.add_argument("--sasl-user", required=True)
    p.add_argument("--window", type=float, default=POP_WINDOW)
    k = sub.add_parser("dkim")
    k.add_argument("--sinks", type=Path, required=True)
    k.add_argument("--sent", type=Path, nargs="+", required=True)
    k.add_argument("--selector", action="append", default=[])
    k.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    try:
        if args.check == "received":
            result = received(args.sinks, args.sink, args.message_id, args.timeout)
        elif args.check == "arrived":
            result = arrived(args.sinks, args.message_id)
        elif args.check == "sasl":
            result = sasl_user(args.maillog, args.message_id, args.user)
        elif args.check == "dkim":
            result = dkim_signed(args.sinks, args.sent, args.selector, args.timeout)
        else:
            result = pop_before_sasl(args.dovecot_log, args.pop_user, args.sasl_user,
                                     args.window)
    except (CheckFailed, OSError) as exc:
        print(f"labcheck {args.check}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
