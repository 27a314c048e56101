"""Sending TLS-RPT reports (RFC 8460): each finished UTC day's counts, per policy domain, to
the ``rua`` mailto: addresses of ``_smtp._tls.<domain>``.

Every ``tls_reports.interval`` the days before today that still have counts in the queue
database are reported: the report is queued as ordinary mail (with ``TLS-Required: No``, so its
own delivery neither obeys nor counts towards any policy) and the day's counts are forgotten.
A domain without a usable ``v=TLSRPTv1`` record has its counts dropped; a DNS failure keeps
them for the next round. With ``tls_reports.enabled`` off, finished days are dropped unsent, so
the counts never grow beyond a day's worth. The report itself is written by the notice service
(``deliverd.reports.notices``), which queues it through the one way in.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from deliverd.config.model import Config
from deliverd.dns.resolver import DnsTempFailure, Resolver
from deliverd.queue.store import QueueStore
from deliverd.reports.notices import Notices
from deliverd.reports.tlsrpt import rua_mailto

log = logging.getLogger("deliverd")


class TlsReporter:
    def __init__(self, cfg: Config, store: QueueStore, resolver: Resolver,
                 notices: Notices) -> None:
        self.cfg = cfg
        self.store = store
        self.resolver = resolver
        self.notices = notices  # writes each report and queues it

    def update(self, cfg: Config, resolver: Resolver) -> None:
        """On reload: the next round follows ``cfg``."""
        self.cfg = cfg
        self.resolver = resolver

    async def run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception:  # a bad day's data must not stop later reports
                log.exception("TLS reports could not be sent")
            await asyncio.sleep(max(self.cfg.tls_reports.interval, 1))

    async def send_due(self, today: str | None = None) -> int:
        """Queue the reports of every finished day; returns how many were queued."""
        today = today or datetime.now(UTC).strftime("%Y-%m-%d")
        sent = 0
        for domain, day in await self.store.tls_result_days(today):
            if not self.cfg.tls_reports.enabled:
                await self.store.forget_tls_results(domain, day)
                continue
            txt = await self.resolver.txt(f"_smtp._tls.{domain}")
            if isinstance(txt, DnsTempFailure):
                continue
            rua = rua_mailto(txt.texts)
            if rua:
                rows = await self.store.tls_results(domain, day)
                queue_id = await self.notices.tls_report(domain, day, rows, rua)
                log.info("%s: TLS report for %s on %s queued to %s", queue_id, domain, day,
                         ", ".join(rua))
                sent += 1
            await self.store.forget_tls_results(domain, day)
        return sent
