"""The typed config from a normalised spec and back (the round trip the tests prove).

``config_from_spec`` builds the frozen dataclasses of ``deliverd.config.model`` (durations in
seconds, sizes in bytes); ``config_to_spec`` gives the normalised spec back. Kept apart from the
model so the model reads as the list of what the engine is configured with.
"""

from __future__ import annotations

from typing import Any

from deliverd.config.model import (
    Account,
    Config,
    Credentials,
    DirectConfig,
    DirectTls,
    DkimKey,
    DnsConfig,
    DsnConfig,
    HostConfig,
    LimitsConfig,
    Listener,
    LocalConfig,
    MasqueradeConfig,
    MetricsConfig,
    OnExpiry,
    PopBeforeSmtp,
    QueueConfig,
    RetryConfig,
    RouteConfig,
    RouteMatch,
    RoutingConfig,
    RoutingMode,
    SmarthostConfig,
    SmarthostHost,
    TimeoutsConfig,
    TlsPolicy,
    TlsReportsConfig,
)
from deliverd.core.units import format_duration, format_size, parse_duration, parse_size


def _creds(d: dict[str, Any] | None) -> Credentials | None:
    return None if d is None else Credentials(d["username"], d["password"])


def _creds_out(c: Credentials | None) -> dict[str, Any] | None:
    return None if c is None else {"username": c.username, "password": c.password}


def _durations(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: parse_duration(v) if k in keys else v for k, v in d.items()}


def _smarthost(sh: dict[str, Any] | None) -> SmarthostConfig | None:
    if sh is None:
        return None
    pop = sh.get("pop_before_smtp")
    return SmarthostConfig(
        **{k: v for k, v in sh.items() if k not in ("tls", "auth", "pop_before_smtp", "hosts")},
        hosts=tuple(SmarthostHost(h["host"], h["port"]) for h in sh.get("hosts", ())),
        tls=TlsPolicy(sh["tls"]),
        auth=_creds(sh.get("auth")),
        pop_before_smtp=None
        if pop is None
        else PopBeforeSmtp(
            **_durations({k: v for k, v in pop.items() if k != "tls"}, "valid_for"),
            tls=TlsPolicy(pop["tls"]),
        ),
    )


def _direct(d: dict[str, Any]) -> DirectConfig:
    return DirectConfig(**{**d, "tls": DirectTls(d["tls"])})


def _route(r: dict[str, Any]) -> RouteConfig:
    match = RouteMatch(**{k: tuple(v) for k, v in r["match"].items()})
    return RouteConfig(r["name"], match, RoutingMode(r["mode"]), _smarthost(r.get("smarthost")))


def config_from_spec(spec: dict[str, Any]) -> Config:
    """Typed config from a *normalised* spec (see ``deliverd.spec.normalise``)."""
    routing = spec["routing"]
    smarthost = _smarthost(routing.get("smarthost"))
    limits = dict(spec["limits"])
    limits["max_message_size"] = parse_size(limits["max_message_size"])
    return Config(
        version=spec["version"],
        host=HostConfig(spec["host"]["name"], tuple(spec["host"]["addresses"])),
        listen=tuple(
            Listener(x["address"], x["port"], tuple(x["allow_networks"])) for x in spec["listen"]
        ),
        queue=QueueConfig(**spec["queue"]),
        routing=RoutingConfig(
            mode=RoutingMode(routing["mode"]),
            direct=_direct(routing["direct"]),
            smarthost=smarthost,
            abort_on_rcpt_5xx=routing["abort_on_rcpt_5xx"],
        ),
        routes=tuple(_route(r) for r in spec["routes"]),
        accounts=tuple(
            Account(a["address"], _creds(a.get("smarthost_auth")), a.get("mail_password"))
            for a in spec["accounts"]
        ),
        retry=RetryConfig(
            **_durations(
                {k: v for k, v in spec["retry"].items() if k != "on_expiry"},
                "temp_error_delay", "interval", "max_interval", "expire_after",
            ),
            on_expiry=OnExpiry(spec["retry"]["on_expiry"]),
        ),
        dsn=DsnConfig(**spec["dsn"]),
        tls_reports=_tls_reports(spec["tls_reports"]),
        limits=LimitsConfig(**_durations(limits, "connection_failure_cache")),
        metrics=MetricsConfig(
            spec["metrics"].get("listen"), tuple(spec["metrics"]["allow_networks"])
        ),
        timeouts=TimeoutsConfig(**_durations(spec["timeouts"], *spec["timeouts"].keys())),
        dns=DnsConfig(tuple(spec["dns"]["nameservers"])),
        local=local_from_spec(spec["local"]),
        masquerade=masquerade_from_spec(spec["masquerade"]),
        dkim=tuple(dkim_from_spec(entry) for entry in spec["dkim"]),
    )


def dkim_from_spec(entry: dict[str, Any]) -> DkimKey:
    return DkimKey(entry["domain"], entry["selector"], entry["key_file"], entry["algorithm"],
                   tuple(entry["headers"]))


def local_from_spec(local: dict[str, Any]) -> LocalConfig:
    return LocalConfig(
        domains=tuple(local["domains"]),
        qualify_domain=local["qualify_domain"],
        aliases=tuple((user, tuple(targets)) for user, targets in local["aliases"].items()),
    )


def masquerade_from_spec(masquerade: dict[str, Any]) -> MasqueradeConfig:
    return MasqueradeConfig(masquerade.get("domain"), tuple(masquerade["except_users"]))


def _tls_reports(d: dict[str, Any]) -> TlsReportsConfig:
    return TlsReportsConfig(
        sender=d["from"], enabled=d["enabled"], **_durations({"interval": d["interval"]},
                                                            "interval"),
    )


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _smarthost_out(sh: SmarthostConfig) -> dict[str, Any]:
    pop = sh.pop_before_smtp
    return _drop_none({
        "host": sh.host,
        "port": sh.port,
        "hosts": [{"host": h.host, "port": h.port} for h in sh.hosts] or None,
        "resolve_mx": sh.resolve_mx,
        "tls": sh.tls.value,
        "verify_tls": sh.verify_tls,
        "ca_file": sh.ca_file,
        "allow_plaintext_auth": sh.allow_plaintext_auth,
        "auth": _creds_out(sh.auth),
        "pop_before_smtp": None
        if pop is None
        else {
            "host": pop.host,
            "port": pop.port,
            "tls": pop.tls.value,
            "username": pop.username,
            "password": pop.password,
            "valid_for": format_duration(pop.valid_for),
        },
        "per_account_auth": sh.per_account_auth,
        "use_account_mail_passwords": sh.use_account_mail_passwords,
        "bounce_on_5xx": sh.bounce_on_5xx,
    })


def _route_out(r: RouteConfig) -> dict[str, Any]:
    match = {k: list(v) for k, v in vars(r.match).items() if v}
    out: dict[str, Any] = {"name": r.name, "match": match, "mode": r.mode.value}
    if r.smarthost is not None:
        out["smarthost"] = _smarthost_out(r.smarthost)
    return out


def config_to_spec(cfg: Config) -> dict[str, Any]:
    """The normalised spec this config was built from."""
    sh = cfg.routing.smarthost
    routing: dict[str, Any] = {
        "mode": cfg.routing.mode.value,
        "direct": {
            "port": cfg.routing.direct.port,
            "bounce_on_no_mx": cfg.routing.direct.bounce_on_no_mx,
            "bounce_on_mx_5xx": cfg.routing.direct.bounce_on_mx_5xx,
            "tls": cfg.routing.direct.tls.value,
            "mta_sts": cfg.routing.direct.mta_sts,
            "dane": cfg.routing.direct.dane,
        },
        "abort_on_rcpt_5xx": cfg.routing.abort_on_rcpt_5xx,
    }
    if sh is not None:
        routing["smarthost"] = _smarthost_out(sh)
    lim, tmo, rty = cfg.limits, cfg.timeouts, cfg.retry
    return {
        "version": cfg.version,
        "host": {"name": cfg.host.name, "addresses": list(cfg.host.addresses)},
        "listen": [
            {"address": x.address, "port": x.port, "allow_networks": list(x.allow_networks)}
            for x in cfg.listen
        ],
        "queue": {"path": cfg.queue.path},
        "routing": routing,
        "routes": [_route_out(r) for r in cfg.routes],
        "accounts": [
            _drop_none({
                "address": a.address,
                "smarthost_auth": _creds_out(a.smarthost_auth),
                "mail_password": a.mail_password,
            })
            for a in cfg.accounts
        ],
        "retry": {
            "temp_error_delay": format_duration(rty.temp_error_delay),
            "interval": format_duration(rty.interval),
            "max_interval": format_duration(rty.max_interval),
            "expire_after": format_duration(rty.expire_after),
            "on_expiry": rty.on_expiry.value,
        },
        "dsn": {
            "notify_delayed": cfg.dsn.notify_delayed,
            "include_transcript": cfg.dsn.include_transcript,
            "notify_postmaster": cfg.dsn.notify_postmaster,
            "postmaster": cfg.dsn.postmaster,
        },
        "tls_reports": {
            "enabled": cfg.tls_reports.enabled,
            "from": cfg.tls_reports.sender,
            "interval": format_duration(cfg.tls_reports.interval),
        },
        "limits": {
            "max_sessions": lim.max_sessions,
            "per_destination": lim.per_destination,
            "messages_per_session": lim.messages_per_session,
            "connection_failure_cache": format_duration(lim.connection_failure_cache),
            "max_hops": lim.max_hops,
            "max_message_size": format_size(lim.max_message_size),
            "max_inbound_sessions": lim.max_inbound_sessions,
            "max_inbound_per_client": lim.max_inbound_per_client,
            "smtp_workers": lim.smtp_workers,
        },
        "metrics": _drop_none({
            "listen": cfg.metrics.listen,
            "allow_networks": list(cfg.metrics.allow_networks),
        }),
        "timeouts": {k: format_duration(getattr(tmo, k)) for k in
                     ("connect", "greeting", "command", "data_response", "dns")},
        "dns": {"nameservers": list(cfg.dns.nameservers)},
        "local": {
            "domains": list(cfg.local.domains),
            "qualify_domain": cfg.local.qualify_domain,
            "aliases": {user: list(targets) for user, targets in cfg.local.aliases},
        },
        "masquerade": _drop_none({
            "domain": cfg.masquerade.domain,
            "except_users": list(cfg.masquerade.except_users),
        }),
        "dkim": [{"domain": k.domain, "selector": k.selector, "key_file": k.key_file,
                  "algorithm": k.algorithm, "headers": list(k.headers)} for k in cfg.dkim],
    }
