"""bench/big-messages: N concurrent submissions of S bytes through the relay, deliverd (and, in
the same run, Postfix) between a Python submitter and Postfix's smtp-sink on loopback.

Per MTA it prints: the root process's VmRSS before the load and its VmHWM after it (deliverd is
one process: that is its whole footprint; Postfix's master is not where the work happens, so
its figure is the peak of the process tree's summed Pss, sampled every 200 ms, printed for both),
the time until every submission got its 250 (accept) and until the sink had counted every
message and the queue was empty (deliver).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _proctree import RssSampler, status_kb
from _relay import DELIVERD_LIMITS, LOOPBACK, Deliverd, Mta, Postfix, Sink, _wait_drained

MB = 1024 * 1024


def message(size: int, n: int) -> bytes:
    """About ``size`` bytes: headers, then base64 lines as an attachment would be."""
    head = (f"From: bench@source.test\r\nTo: sink@dest.test\r\nSubject: big {n}\r\n"
            f"Message-ID: <big-{n}-{time.time_ns()}@source.test>\r\n\r\n").encode()
    raw = os.urandom(max(0, size - len(head)) * 57 // 78)
    return head + base64.encodebytes(raw).replace(b"\n", b"\r\n")


def submit(port: int, data: bytes, errors: list[str]) -> None:
    try:
        with smtplib.SMTP(LOOPBACK, port, timeout=600) as smtp:
            smtp.sendmail("bench@source.test", ["sink@dest.test"], data)
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def run(kind: str, base: Path, count: int, size: int) -> dict[str, Any]:
    workdir = base / kind
    workdir.mkdir()
    workdir.chmod(0o755)
    sink = Sink(workdir)
    limit = f"{max(60, size * 2 // MB)}MB"
    mta: Mta
    if kind == "deliverd":
        mta = Deliverd(workdir, sink.port, {**DELIVERD_LIMITS, "max_message_size": limit})
    else:
        postfix = Postfix(workdir, sink.port)
        main_cf = postfix.relay.config_dir / "main.cf"
        with main_cf.open("a") as cf:  # Postfix's default is 10 MB
            cf.write(f"message_size_limit = {max(60 * MB, size * 2)}\n")
        mta = postfix
    bodies = [message(size, n) for n in range(count)]
    try:
        mta.start()
        time.sleep(0.5)
        root = mta.root()
        rss_before = status_kb(root, "VmRSS")
        sampler = RssSampler(mta.tree)
        sampler.start()
        errors: list[str] = []
        threads = [threading.Thread(target=submit, args=(mta.port, body, errors))
                   for body in bodies]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        t_accept = time.monotonic()
        if errors:
            raise RuntimeError(f"{kind}: submissions failed: {errors}")
        t_end = _wait_drained(mta, sink, count, timeout=600)
        peak_pss = sampler.stop()
        hwm = status_kb(root, "VmHWM")
    finally:
        mta.stop()
        sink.stop()
    return {
        "mta": kind, "messages": count, "size_mb": round(len(bodies[0]) / MB, 1),
        "rss_before_mb": round(rss_before / 1024, 1), "root_vmhwm_mb": round(hwm / 1024, 1),
        "tree_peak_pss_mb": round(peak_pss / 1024, 1),
        "accept_s": round(t_accept - t0, 2), "deliver_s": round(t_end - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/big-messages", description=__doc__)
    parser.add_argument("--count", "-n", type=int, default=1, help="concurrent submissions")
    parser.add_argument("--size-mb", "-s", type=float, default=40.0, help="size of each (MiB)")
    parser.add_argument("--mta", choices=("deliverd", "postfix", "both"), default="both")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    kinds = ("deliverd", "postfix") if args.mta == "both" else (args.mta,)
    results = []
    with tempfile.TemporaryDirectory(prefix="deliverd-big-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        for kind in kinds:
            result = run(kind, base, args.count, int(args.size_mb * MB))
            results.append(result)
            print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
