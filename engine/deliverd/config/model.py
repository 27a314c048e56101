"""The engine's typed view of a normalised spec: frozen dataclasses, durations in seconds.

``config_from_spec`` builds it from a normalised spec, ``config_to_spec`` gives the normalised
spec back (the round trip the tests prove). Passwords are fields with ``repr=False`` so a config
object printed in a log or traceback never shows one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from deliverd.core.units import format_duration, format_size, parse_duration, parse_size


class RoutingMode(StrEnum):
    DIRECT = "direct"
    SMARTHOST = "smarthost"
    DIRECT_THEN_SMARTHOST = "direct_then_smarthost"


class TlsPolicy(StrEnum):
    STARTTLS = "starttls"
    TLS = "tls"
    OPPORTUNISTIC = "opportunistic"
    NONE = "none"


class OnExpiry(StrEnum):
    BOUNCE = "bounce"
    HOLD = "hold"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class HostConfig:
    name: str
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listener:
    address: str
    port: int = 2525
    allow_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    path: str = "/var/spool/deliverd"


@dataclass(frozen=True)
class DirectConfig:
    port: int = 25
    bounce_on_no_mx: bool = False
    bounce_on_mx_5xx: bool = True


@dataclass(frozen=True)
class PopBeforeSmtp:
    host: str
    port: int
    tls: TlsPolicy
    username: str
    password: str = field(repr=False)
    valid_for: int = 300


@dataclass(frozen=True)
class SmarthostHost:
    """One entry of a smart host failover list."""

    host: str
    port: int = 25


@dataclass(frozen=True)
class SmarthostConfig:
    host: str | None = None
    port: int = 25
    hosts: tuple[SmarthostHost, ...] = ()
    resolve_mx: bool = False
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    verify_tls: bool = True
    ca_file: str | None = None
    allow_plaintext_auth: bool = False
    auth: Credentials | None = None
    pop_before_smtp: PopBeforeSmtp | None = None
    per_account_auth: bool = False
    use_account_mail_passwords: bool = False
    bounce_on_5xx: bool = False

    @property
    def targets(self) -> tuple[SmarthostHost, ...]:
        """The smart hosts in the order they are tried: the hosts list, or host and port."""
        if self.hosts:
            return self.hosts
        return (SmarthostHost(self.host, self.port),) if self.host is not None else ()

    @property
    def name(self) -> str:
        """How logs and reports name this smart host: its first (or only) host."""
        return self.targets[0].host if self.targets else ""


@dataclass(frozen=True)
class RoutingConfig:
    mode: RoutingMode = RoutingMode.DIRECT
    direct: DirectConfig = DirectConfig()
    smarthost: SmarthostConfig | None = None
    abort_on_rcpt_5xx: bool = False


@dataclass(frozen=True)
class RouteMatch:
    """What a message must match for a route: every non-empty field must match."""

    sender: tuple[str, ...] = ()
    sender_domain: tuple[str, ...] = ()
    recipient_domain: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteConfig:
    """One entry of ``routes[]``: first match wins, else ``routing``."""

    name: str
    match: RouteMatch
    mode: RoutingMode = RoutingMode.DIRECT
    smarthost: SmarthostConfig | None = None


@dataclass(frozen=True)
class Account:
    address: str
    smarthost_auth: Credentials | None = None
    mail_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RetryConfig:
    temp_error_delay: int = 180
    interval: int = 900
    max_interval: int = 14400
    expire_after: int = 172800
    on_expiry: OnExpiry = OnExpiry.BOUNCE


@dataclass(frozen=True)
class DsnConfig:
    postmaster: str
    notify_delayed: bool = True
    include_transcript: bool = True
    notify_postmaster: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = 30
    per_destination: int = 10
    messages_per_session: int = 0
    connection_failure_cache: int = 300
    max_hops: int = 30
    max_message_size: int = 50 * 1024 * 1024
    max_inbound_sessions: int = 100
    max_inbound_per_client: int = 20


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: ``listen`` is ``address:port``, None when off."""

    listen: str | None = None
    allow_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: int = 30
    greeting: int = 60
    command: int = 300
    data_response: int = 600
    dns: int = 10


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class LocalConfig:
    """Users of this host. Empty ``domains`` and ``qualify_domain`` (a config built by hand)
    mean no address is local and none is completed."""

    domains: tuple[str, ...] = ()
    qualify_domain: str = ""
    # (user, targets) pairs in spec order; "*" is every other local user.
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class MasqueradeConfig:
    domain: str | None = None
    except_users: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    host: HostConfig
    dsn: DsnConfig
    version: int = 1
    listen: tuple[Listener, ...] = (Listener("127.0.0.1"),)
    queue: QueueConfig = QueueConfig()
    routing: RoutingConfig = RoutingConfig()
    routes: tuple[RouteConfig, ...] = ()
    accounts: tuple[Account, ...] = ()
    retry: RetryConfig = RetryConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    dns: DnsConfig = DnsConfig()
    local: LocalConfig = LocalConfig()
    masquerade: MasqueradeConfig = MasqueradeConfig()

    def secrets(self) -> tuple[str, ...]:
        """Every password in this config: the log filter masks them all."""
        found: list[str | None] = []
        for sh in (self.routing.smarthost, *(r.smarthost for r in self.routes)):
            if sh is not None:
                found.append(sh.auth.password if sh.auth else None)
                found.append(sh.pop_before_smtp.password if sh.pop_before_smtp else None)
        for account in self.accounts:
            found.append(account.smarthost_auth.password if account.smarthost_auth else None)
            found.append(account.mail_password)
        return tuple(sorted({s for s in found if s}))

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.name == name), None)

    def for_route(self, name: str | None) -> Config:
        """This config as seen by mail on route ``name``: its mode and smart host in
        ``routing``, everything else shared. ``None`` (or an unknown name) is the default."""
        route = self.route(name) if name is not None else None
        if route is None:
            return self
        routing = replace(self.routing, mode=route.mode, smarthost=route.smarthost)
        return replace(self, routing=routing)

    def account_for(self, sender: str) -> Account | None:
        """The account whose address is the envelope sender (case-insensitive)."""
        wanted = sender.lower()
        for account in self.accounts:
            if account.address.lower() == wanted:
                return account
        return None


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
            direct=DirectConfig(**routing["direct"]),
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
        limits=LimitsConfig(**_durations(limits, "connection_failure_cache")),
        metrics=MetricsConfig(
            spec["metrics"].get("listen"), tuple(spec["metrics"]["allow_networks"])
        ),
        timeouts=TimeoutsConfig(**_durations(spec["timeouts"], *spec["timeouts"].keys())),
        dns=DnsConfig(tuple(spec["dns"]["nameservers"])),
        local=local_from_spec(spec["local"]),
        masquerade=masquerade_from_spec(spec["masquerade"]),
    )


def local_from_spec(local: dict[str, Any]) -> LocalConfig:
    return LocalConfig(
        domains=tuple(local["domains"]),
        qualify_domain=local["qualify_domain"],
        aliases=tuple((user, tuple(targets)) for user, targets in local["aliases"].items()),
    )


def masquerade_from_spec(masquerade: dict[str, Any]) -> MasqueradeConfig:
    return MasqueradeConfig(masquerade.get("domain"), tuple(masquerade["except_users"]))


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
        "limits": {
            "max_sessions": lim.max_sessions,
            "per_destination": lim.per_destination,
            "messages_per_session": lim.messages_per_session,
            "connection_failure_cache": format_duration(lim.connection_failure_cache),
            "max_hops": lim.max_hops,
            "max_message_size": format_size(lim.max_message_size),
            "max_inbound_sessions": lim.max_inbound_sessions,
            "max_inbound_per_client": lim.max_inbound_per_client,
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
    }
