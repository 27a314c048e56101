"""The engine's typed view of a normalised spec: frozen dataclasses, durations in seconds.

``config_from_spec`` builds it from a normalised spec, ``config_to_spec`` gives the normalised
spec back (the round trip the tests prove). Passwords are fields with ``repr=False`` so a config
object printed in a log or traceback never shows one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class RoutingMode(StrEnum):
    DIRECT = "direct"
    SMARTHOST = "smarthost"
    DIRECT_THEN_SMARTHOST = "direct_then_smarthost"


class TlsPolicy(StrEnum):
    STARTTLS = "starttls"
    TLS = "tls"
    OPPORTUNISTIC = "opportunistic"
    NONE = "none"


class DirectTls(StrEnum):
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


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
    tls: DirectTls = DirectTls.OPPORTUNISTIC
    mta_sts: bool = True
    dane: bool = True


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
class TlsReportsConfig:
    sender: str = "postmaster@localhost"  # the spec's tls_reports.from
    enabled: bool = False
    interval: int = 3600


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
    smtp_workers: int = 0


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
class DkimKey:
    """One ``dkim[]`` entry: the key is read from ``key_file`` by ``deliverd.dkim``, never here."""

    domain: str
    selector: str
    key_file: str
    algorithm: str = "rsa-sha256"
    headers: tuple[str, ...] = ("From", "To", "Subject", "Date", "Message-ID")


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
    tls_reports: TlsReportsConfig = TlsReportsConfig()
    dkim: tuple[DkimKey, ...] = ()

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
