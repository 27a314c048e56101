"""``deliverd probe`` over every smart host: routing.smarthost and each route's, every host of
a failover list on its own, so an operator sees which one would fail before mail does.

Each host is probed as if it were the only smart host (``probe.probe`` on a config narrowed to
it), with its route's TLS, AUTH and POP settings; the summary is a table of host against
resolve, POP, connect, TLS and AUTH, then each host's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from deliverd.config.model import Config, SmarthostConfig, SmarthostHost
from deliverd.delivery.probe import ProbeConfigError, ProbeReport, probe
from deliverd.dns.resolver import Resolver

_COLUMNS = ("resolve", "pop", "connect", "tls", "auth")


@dataclass(frozen=True)
class ProbeSummary:
    reports: tuple[ProbeReport, ...]

    @property
    def ok(self) -> bool:
        return bool(self.reports) and all(r.ok for r in self.reports)

    @property
    def main(self) -> ProbeReport:
        """The report that matters most: the first that failed, else the first."""
        return next((r for r in self.reports if not r.ok), self.reports[0])

    def as_dict(self) -> dict[str, object]:
        """The main report's keys (what a single smart host always gave), plus every host."""
        found = self.main.as_dict()
        found["ok"] = self.ok
        found["hosts"] = [r.as_dict() for r in self.reports]
        return found

    def as_text(self) -> str:
        rows: list[tuple[str, ...]] = [("route", "smart host", *_COLUMNS)]
        rows += [(r.route or "(default)", r.smarthost, *(r.result(c) for c in _COLUMNS))
                 for r in self.reports]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        details = [r.as_text() for r in self.reports]
        verdict = "probe passed" if self.ok else "probe FAILED"
        return "\n".join(table) + "\n\n" + "".join(details) + verdict + "\n"


def _single(smarthost: SmarthostConfig, target: SmarthostHost) -> SmarthostConfig:
    return replace(smarthost, host=target.host, port=target.port, hosts=())


def _targets(cfg: Config, route: str | None) -> Iterator[tuple[str | None, Config]]:
    """(route name, config narrowed to one smart host) for every host to probe."""
    if route is not None and cfg.route(route) is None:
        names = ", ".join(r.name for r in cfg.routes) or "none"
        raise ProbeConfigError(f"no route {route!r} (routes: {names})")
    wanted: list[str | None] = [route] if route is not None else [
        None, *(r.name for r in cfg.routes)]
    for name in wanted:
        seen = cfg.for_route(name)
        smarthost = seen.routing.smarthost
        if smarthost is None or (name is not None and seen is cfg):
            continue
        for target in smarthost.targets:
            one = replace(seen.routing, smarthost=_single(smarthost, target))
            yield name, replace(seen, routing=one)


async def probe_every_smarthost(
    cfg: Config,
    *,
    route: str | None = None,
    account: str | None = None,
    resolver_factory: Callable[[Config], Resolver] | None = None,
) -> ProbeSummary:
    """Probe each smart host (of ``route`` only, when given); ``ProbeConfigError`` when there
    is none to probe."""
    reports = []
    for name, narrowed in _targets(cfg, route):
        report = await probe(narrowed, account=account, resolver_factory=resolver_factory)
        reports.append(replace(report, route=name))
    if not reports:
        if route is not None:
            raise ProbeConfigError(f"route {route!r} has no smart host: nothing to probe")
        raise ProbeConfigError("routing.smarthost is not configured and no route has a smart "
                               "host: nothing to probe")
    return ProbeSummary(tuple(reports))
