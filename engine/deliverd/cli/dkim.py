"""``deliverd dkim record -c FILE`` and ``deliverd dkim check -c FILE``.

``record`` prints the DNS zone line of every ``dkim[]`` key (what to publish); ``check`` asks
DNS (the config's ``dns.nameservers``, else the system's) for each record and checks it
publishes the key on this host and that a test signature verifies against it.

Exit codes: 0 done (every check passed), 1 a check failed, 2 the config or a key cannot be
used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dns.exception
import dns.resolver

from deliverd.config.loader import ConfigError, load_config
from deliverd.config.model import Config
from deliverd.dkim.check import KeyCheck, check_key
from deliverd.dkim.keys import DkimKeyError, SigningKey, load_key
from deliverd.dns.resolver import parse_nameserver

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dkim", help="DKIM keys: the DNS records to publish, and checking them")
    actions = p.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    for name, func, text in (
        ("record", _record, "print the DNS TXT zone line of every dkim[] key"),
        ("check", _check, "check each key's record in DNS: present, matching, verifying"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("-c", "--config", type=Path, default=Path("/etc/deliverd/deliverd.toml"))
        a.add_argument("--secrets", type=Path, default=None,
                       help="secrets file (default: secrets.toml beside the config)")
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=func)


def _keys(args: argparse.Namespace) -> tuple[Config, list[SigningKey]] | None:
    try:
        cfg = load_config(args.config, args.secrets)
        return cfg, [load_key(entry) for entry in cfg.dkim]
    except (ConfigError, DkimKeyError) as exc:
        print(f"deliverd dkim: {exc}", file=sys.stderr)
        return None


def _record(args: argparse.Namespace) -> int:
    loaded = _keys(args)
    if loaded is None:
        return EXIT_CONFIG
    _, keys = loaded
    if args.json:
        print(json.dumps([{"name": k.record_name, "type": "TXT", "value": k.txt_value(),
                           "zone_line": k.zone_line()} for k in keys], indent=2))
    else:
        for key in keys:
            print(key.zone_line())
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    loaded = _keys(args)
    if loaded is None:
        return EXIT_CONFIG
    cfg, keys = loaded
    resolver = _resolver(cfg)
    results = [_check_one(resolver, key, cfg.timeouts.dns) for key in keys]
    if args.json:
        print(json.dumps([{"name": r.name, "selector": r.selector, "domain": r.domain,
                           "ok": r.ok, "problems": list(r.problems),
                           "published": r.published} for r in results], indent=2))
    else:
        for r in results:
            verdict = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
            print(f"{r.name} ({r.algorithm}): {verdict}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _resolver(cfg: Config) -> dns.resolver.Resolver:
    if not cfg.dns.nameservers:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [parse_nameserver(ns) for ns in cfg.dns.nameservers]
    return resolver


def _check_one(resolver: dns.resolver.Resolver, key: SigningKey, timeout: float) -> KeyCheck:
    try:
        published = _txt(resolver, key.record_name, timeout)
    except dns.exception.DNSException as exc:
        entry = key.entry
        return KeyCheck(key.record_name, entry.selector, entry.domain, entry.algorithm,
                        (f"DNS lookup failed: {exc}",))
    return check_key(key, published)


def _txt(resolver: dns.resolver.Resolver, name: str, timeout: float) -> str | None:
    """The record's text (its strings joined), None when the name has no TXT record."""
    try:
        answer = resolver.resolve(name, "TXT", lifetime=max(timeout, 1.0))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    values = [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]
    dkim = [v for v in values if "p=" in v]
    return dkim[0] if dkim else (values[0] if values else None)
