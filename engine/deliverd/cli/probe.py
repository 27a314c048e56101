"""``deliverd probe -c FILE``: smart host preflight (resolve, POP, TLS, AUTH; sends no mail)
of every smart host: routing.smarthost and each route's, each host of a failover list.

Exit codes: 0 every step passed, 1 a step failed, 2 the config cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from deliverd.config.loader import ConfigError, load_config
from deliverd.delivery.probe import ProbeConfigError
from deliverd.delivery.probe_routes import probe_every_smarthost

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe", help="check that the smart host accepts this host (no mail is sent)"
    )
    p.add_argument("-c", "--config", type=Path, default=Path("/etc/deliverd/deliverd.toml"))
    p.add_argument("--secrets", type=Path, default=None,
                   help="secrets file (default: secrets.toml beside the config)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--account", metavar="ADDR", default=None,
                   help="test the login this account's mail would use (per_account_auth)")
    p.add_argument("--route", metavar="NAME", default=None,
                   help="probe only this route's smart host (default: every smart host)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.secrets)
        report = asyncio.run(
            probe_every_smarthost(cfg, route=args.route, account=args.account))
    except (ConfigError, ProbeConfigError) as exc:
        print(f"deliverd probe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        sys.stdout.write(report.as_text())
    return EXIT_OK if report.ok else EXIT_FAILED
