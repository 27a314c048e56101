"""The notices the engine sends about mail (Postfix's ``bounce``): each is written here and
handed to the one way into the queue, like mail from any other source.

The scheduler asks for DSNs (``dsns``: failed, delayed, relayed) and the TLS reporter for a
day's TLS report (``tls_report``); neither writes a notice itself. A notice is a source like
any other (``deliverd.submission.cleanup.Intake``: local users' rules, DKIM, the trace header,
the COMMIT, the scheduler's wake-up), with two differences: it comes from the engine
(``origin=notice``), and a DKIM key that cannot be read leaves it unsigned rather than lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from deliverd.core.dsn_params import Ret
from deliverd.core.outcomes import Outcome, StreamedBody
from deliverd.queue.store import QueuedMessage
from deliverd.reports.dsn import (
    RETURN_FULL_LIMIT,
    DsnKind,
    build_dsn,
    requires_smtputf8,
    returned_message,
)
from deliverd.reports.tlsrpt import ResultRow, report_json, report_message
from deliverd.submission.cleanup import Intake


class Notices:
    """Writes notices with the running config of ``intake`` and queues them through it."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def dsns(
        self,
        kind: DsnKind,
        message: QueuedMessage,
        data: bytes | StreamedBody,
        notices: Sequence[tuple[str, Sequence[Outcome]]],
        *,
        retry_until: datetime,
    ) -> list[str]:
        """One DSN of ``kind`` about ``message`` per (address, outcomes); their queue ids."""
        cfg = self.intake.current()
        returned = None
        if kind is DsnKind.FAILURE and message.ret == Ret.FULL.value:
            returned = await _returned(data)
        orcpts = {r.address: r.orcpt for r in message.recipients if r.orcpt is not None}
        queued = []
        for to, outcomes in notices:
            report = build_dsn(
                kind=kind,
                reporting_mta=cfg.host.name,
                original_sender=message.sender,
                queue_id=message.queue_id,
                arrival=datetime.fromtimestamp(message.arrival, UTC),
                original=data if isinstance(data, bytes) else data.head,
                outcomes=outcomes,
                include_transcript=cfg.dsn.include_transcript,
                retry_until=retry_until,
                to=to,
                envid=message.envid,
                orcpts=orcpts,
                returned=returned,
                size=message.size,
            )
            queued.append(await self._queue(
                "", (to,), report, smtputf8=requires_smtputf8(report), is_dsn=True
            ))
        return queued

    async def tls_report(
        self, domain: str, day: str, rows: Sequence[ResultRow], rua: Sequence[str]
    ) -> str:
        """The TLS report (RFC 8460) of ``domain``'s ``day`` to its ``rua`` addresses."""
        cfg = self.intake.current()
        sender = cfg.tls_reports.sender
        report = report_json(domain=domain, day=day, organization=cfg.host.name,
                             contact=sender, rows=rows)
        data = report_message(report, domain=domain, submitter=cfg.host.name, sender=sender,
                              recipients=rua)
        return await self._queue(sender, tuple(rua), data)

    async def _queue(
        self, sender: str, recipients: tuple[str, ...], message: bytes, *,
        smtputf8: bool = False, is_dsn: bool = False,
    ) -> str:
        return await self.intake.admit_local(
            message, sender, recipients, how="deliverd notice", origin="origin=notice",
            source="notice", smtputf8=smtputf8, is_dsn=is_dsn, notice=True,
        )


async def _returned(data: bytes | StreamedBody) -> bytes:
    """What RET=FULL returns: read chunk by chunk, never more than the limit and a chunk."""
    if isinstance(data, bytes):
        return returned_message(data, len(data))
    prefix = bytearray()
    chunks = data.chunks()
    try:
        async for chunk in chunks:
            prefix += chunk
            if len(prefix) > RETURN_FULL_LIMIT:
                break
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return returned_message(bytes(prefix), data.size)
