"""RFC 2920 PIPELINING in the outbound transaction, against real servers on loopback.

The scripted sink records, beside every command it reads, the input that had already arrived
behind it (``SessionRecord.ahead``): a pipelining client's MAIL arrives with its RCPTs (and
DATA) right behind it, a lock-step client's never does. Against Postfix the transcript shows
it: commands are noted as they are written, so a group's commands stand together before the
first of their replies. (Postfix itself accepts early commands even with PIPELINING withheld:
neither its log nor ``reject_unauth_pipelining`` objected when this was tried, so they prove
nothing here.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from deliverd.config.model import Credentials
from deliverd.core.outcomes import (
    Envelope,
    Hop,
    Route,
    Stage,
    StreamedBody,
    TransactionResult,
)
from deliverd.smtp.transport import Transport
from deliverd_lab import PostfixRelay
from deliverd_lab.sink import SessionRecord
from tests.fixtures.smtp_sink import S421_CLOSING, S550_NO_USER, SinkFactory, free_port
from tests.lab.test_transport import (
    BODY,
    PASSWORD,
    direct,
    envelope,
    make_cfg,
    relay,
    send,
    smarthost_cfg,
)

pytestmark = pytest.mark.integration

S452_FULL = "452 4.2.2 mailbox full"
S550_SENDER = "550 5.7.1 sender refused"


def session_commands(record: SessionRecord) -> list[tuple[str, bytes]]:
    """(command, input already waiting behind it) for the transaction's commands."""
    return [
        (command, ahead) for command, ahead in zip(record.commands, record.ahead, strict=True)
        if command.split()[0] in ("MAIL", "RCPT", "DATA", "RSET")
    ]


def sent_before_first_reply(transcript: tuple[str, ...]) -> list[str]:
    """The commands noted from MAIL on until the first reply after it."""
    start = next(i for i, line in enumerate(transcript) if line.startswith(">>> MAIL"))
    commands: list[str] = []
    for line in transcript[start:]:
        if not line.startswith(">>> "):
            break
        commands.append(line[4:])
    return commands


async def transact_and_keep(cfg: Any, hop: Hop, env: Envelope) -> tuple[TransactionResult, int]:
    """One transaction, and how many sessions the transport then keeps for reuse."""
    transport = Transport(cfg)
    try:
        result = await transport.transact(hop, env)
        return result, transport.idle_sessions
    finally:
        await transport.close()


# -- the sink that offers PIPELINING ---------------------------------------------------------


async def test_mail_rcpts_and_data_go_out_in_one_group(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(pipelining=True)
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test", "y@dst.test"))
    assert result.failure is None
    assert result.data_reply is not None and result.data_reply.code == 250
    assert {r: rep.code for r, rep in result.rcpt_replies.items()} == {
        "x@dst.test": 250, "y@dst.test": 250}
    [record] = sink.sessions
    (mail, ahead), *_ = session_commands(record)
    assert mail.startswith("MAIL FROM:<a@src.test>")
    assert ahead == b"RCPT TO:<x@dst.test>\r\nRCPT TO:<y@dst.test>\r\nDATA\r\n"
    assert sent_before_first_reply(result.transcript)[1:] == [
        "RCPT TO:<x@dst.test>", "RCPT TO:<y@dst.test>", "DATA"]
    assert sink.wait_for(1)
    [message] = sink.messages
    assert message.rcpt_tos == ("x@dst.test", "y@dst.test")
    assert message.data.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")


async def test_without_pipelining_offered_every_command_waits_for_its_reply(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink()
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test", "y@dst.test"))
    assert result.failure is None and result.data_reply is not None
    commands = session_commands(sink.sessions[0])
    assert [c.split()[0] for c, _ in commands] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert all(ahead == b"" for _, ahead in commands)
    [mail] = sent_before_first_reply(result.transcript)
    assert mail.startswith("MAIL FROM:<a@src.test>")


async def test_each_rcpt_keeps_its_own_reply_in_a_pipelined_group(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER,
                                            "full@dst.test": S452_FULL})
    recipients = ("good1@dst.test", "bad@dst.test", "full@dst.test", "good2@dst.test")
    result = await send(make_cfg(), direct(sink), envelope(*recipients))
    assert result.failure is None and not result.aborted
    assert {r: (rep.code, rep.enhanced) for r, rep in result.rcpt_replies.items()} == {
        "good1@dst.test": (250, "2.1.5"), "bad@dst.test": (550, "5.1.1"),
        "full@dst.test": (452, "4.2.2"), "good2@dst.test": (250, "2.1.5")}
    assert result.data_reply is not None and result.data_reply.code == 250
    assert sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ("good1@dst.test", "good2@dst.test")
    assert b"DATA\r\n" in session_commands(sink.sessions[0])[0][1]


async def test_421_mid_group_ends_the_session_with_the_replies_read_so_far(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"closing@dst.test": S421_CLOSING})
    env = envelope("first@dst.test", "closing@dst.test", "never@dst.test")
    result, idle = await transact_and_keep(make_cfg(), direct(sink), env)
    assert result.failure is not None and result.failure.stage is Stage.RCPT
    assert result.failure.reply is not None and result.failure.reply.code == 421
    assert {r: rep.code for r, rep in result.rcpt_replies.items()} == {
        "first@dst.test": 250, "closing@dst.test": 421}
    assert result.data_reply is None and idle == 0
    assert sink.messages == []


async def test_refused_mail_ignores_the_rcpt_replies_and_stays_in_step(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, mail=S550_SENDER)
    result, idle = await transact_and_keep(
        make_cfg(), direct(sink), envelope("x@dst.test", "y@dst.test"))
    assert result.failure is not None and result.failure.stage is Stage.MAIL
    assert result.failure.reply is not None and result.failure.reply.code == 550
    assert result.rcpt_replies == {}  # the 503s to RCPT say nothing about the recipients
    # The RCPT and DATA replies were read before RSET, so the session could be reused.
    assert [c.split()[0] for c, _ in session_commands(sink.sessions[0])] == [
        "MAIL", "RCPT", "RCPT", "DATA", "RSET"]
    assert idle == 1
    assert sink.messages == []


async def test_every_rcpt_refused_then_datas_refusal_is_read_and_the_session_reset(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER,
                                            "full@dst.test": S452_FULL})
    cfg = make_cfg()
    transport = Transport(cfg)
    try:
        result = await transport.transact(direct(sink), envelope("bad@dst.test", "full@dst.test"))
        assert transport.idle_sessions == 1
        again = await transport.transact(direct(sink), envelope("ok@dst.test"))
    finally:
        await transport.close()
    assert result.failure is None and result.data_reply is None and not result.aborted
    assert [r.code for r in result.rcpt_replies.values()] == [550, 452]
    assert any(line.startswith("<<< 503") for line in result.transcript)  # DATA refused
    assert again.failure is None and again.data_reply is not None  # the session was in step
    assert len(sink.sessions) == 1
    assert sink.wait_for(1) and sink.messages[0].rcpt_tos == ("ok@dst.test",)


async def test_354_to_data_with_no_recipient_accepted_drops_the_session_unsent(
    smtp_sink: SinkFactory,
) -> None:
    # RFC 2920 asks for 503 or 554 here; a server that says 354 waits for a body it must
    # not get, and nothing but dropping the connection leaves it without one.
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER},
                     data_start="354 go ahead")
    result, idle = await transact_and_keep(make_cfg(), direct(sink), envelope("bad@dst.test"))
    assert result.failure is None and result.data_reply is None
    assert result.rcpt_replies["bad@dst.test"].code == 550
    assert idle == 0
    assert [c.split()[0] for c in sink.sessions[0].commands][-2:] == ["RCPT", "DATA"]
    assert sink.messages == []


async def test_refused_mail_stays_the_result_when_the_owed_replies_never_come(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, mail=S550_SENDER, drop="rcpt")
    result, idle = await transact_and_keep(make_cfg(), direct(sink), envelope("x@dst.test"))
    assert result.failure is not None and result.failure.stage is Stage.MAIL
    assert result.failure.reply is not None and result.failure.reply.code == 550
    assert not result.failure.temporary
    assert idle == 0


async def test_refused_rcpts_stay_the_result_when_datas_reply_never_comes(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER}, drop="data")
    result, idle = await transact_and_keep(make_cfg(), direct(sink), envelope("bad@dst.test"))
    assert result.failure is None and result.data_reply is None
    assert result.rcpt_replies["bad@dst.test"].code == 550
    assert idle == 0


async def test_abort_on_rcpt_5xx_keeps_data_out_of_the_group(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER})
    cfg = make_cfg({"abort_on_rcpt_5xx": True})
    result = await send(cfg, direct(sink), envelope("bad@dst.test", "good@dst.test"))
    assert result.aborted and result.failure is None and result.data_reply is None
    assert result.rcpt_replies["good@dst.test"].code == 250
    commands = session_commands(sink.sessions[0])
    assert commands[0][1] == b"RCPT TO:<bad@dst.test>\r\nRCPT TO:<good@dst.test>\r\n"
    assert [c.split()[0] for c, _ in commands] == ["MAIL", "RCPT", "RCPT", "RSET"]
    assert sink.messages == []


async def test_abort_on_rcpt_5xx_with_all_accepted_sends_data_after_the_group(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True)
    cfg = make_cfg({"abort_on_rcpt_5xx": True})
    result = await send(cfg, direct(sink), envelope("x@dst.test", "y@dst.test"))
    assert not result.aborted and result.data_reply is not None
    commands = session_commands(sink.sessions[0])
    assert [c.split()[0] for c, _ in commands] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert commands[-1][1] == b""  # DATA went alone, after the RCPT replies
    assert sink.wait_for(1)


async def test_data_refused_after_pipelined_354_is_a_data_failure(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(pipelining=True, data="554 5.6.0 message rejected")
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test"))
    assert result.failure is not None and result.failure.stage is Stage.DATA
    assert result.failure.reply is not None and result.failure.reply.code == 554
    assert result.rcpt_replies["x@dst.test"].code == 250


async def test_streamed_body_follows_a_pipelined_data(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(pipelining=True)
    data = b"Subject: big\r\n\r\n" + b"".join(
        b".line %05d of a body read in chunks\r\n" % i for i in range(3000))

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 7001):
            yield data[at:at + 7001]

    env = Envelope("a@src.test", ("x@dst.test",), StreamedBody(len(data), data[:7001], chunks))
    result = await send(make_cfg(), direct(sink), env)
    assert result.failure is None and result.data_reply is not None
    assert session_commands(sink.sessions[0])[0][1].endswith(b"DATA\r\n")
    assert sink.wait_for(1) and sink.messages[0].data == data


async def test_pipelined_session_closed_while_idle_reconnects(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(pipelining=True, idle_timeout=0.3)
    transport = Transport(make_cfg())
    try:
        assert (await transport.transact(direct(sink), envelope())).failure is None
        await asyncio.sleep(0.6)
        result = await transport.transact(direct(sink), envelope())
    finally:
        await transport.close()
    assert result.failure is None, result.failure
    assert sink.wait_for(2) and len(sink.sessions) == 2


async def test_pipelined_transactions_reuse_one_session(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(pipelining=True, rcpt={"bad@dst.test": S550_NO_USER})
    transport = Transport(make_cfg())
    try:
        results = [await transport.transact(direct(sink), envelope(rcpt, "ok@dst.test"))
                   for rcpt in ("a@dst.test", "bad@dst.test", "c@dst.test")]
    finally:
        await transport.close()
    assert [r.rcpt_replies[rcpt].code for r, rcpt in zip(
        results, ("a@dst.test", "bad@dst.test", "c@dst.test"), strict=True)] == [250, 550, 250]
    assert all(r.data_reply is not None for r in results)
    assert len(sink.sessions) == 1 and sink.wait_for(3)


async def test_credentials_stay_out_of_a_pipelined_transcript(
    smtp_sink: SinkFactory, ca_file: str,
) -> None:
    sink = smtp_sink(pipelining=True, starttls=True, auth={"relay": PASSWORD},
                     require_auth=True)
    cfg = smarthost_cfg(sink.port, ca_file=ca_file, auth={"username": "relay",
                                                           "password": PASSWORD})
    result = await send(cfg, relay(sink), envelope(), credentials=Credentials("relay", PASSWORD))
    assert result.failure is None, result.failure
    assert sink.messages[0].tls and sink.messages[0].user == "relay"
    assert session_commands(sink.sessions[0])[0][1].endswith(b"DATA\r\n")
    assert PASSWORD not in "\n".join(result.transcript)


@pytest.mark.parametrize("starttls", [False, True])
def test_pipelined_transactions_on_uvloop(
    smtp_sink: SinkFactory, ca_file: str, starttls: bool,
) -> None:
    # The daemon runs on uvloop, whose transports call the data_received they were made with.
    uvloop = pytest.importorskip("uvloop")
    sink = smtp_sink(pipelining=True, starttls=starttls, rcpt={"bad@dst.test": S550_NO_USER})
    cfg = smarthost_cfg(sink.port, ca_file=ca_file, tls="starttls" if starttls else "none")

    async def two() -> list[TransactionResult]:
        transport = Transport(cfg)
        try:
            return [await transport.transact(relay(sink), envelope("bad@dst.test", rcpt))
                    for rcpt in ("x@dst.test", "y@dst.test")]
        finally:
            await transport.close()

    results = uvloop.run(two())
    assert [codes(r) for r in results] == [
        {"bad@dst.test": 550, "x@dst.test": 250}, {"bad@dst.test": 550, "y@dst.test": 250}]
    assert all(r.data_reply is not None for r in results)
    assert sink.wait_for(2) and len(sink.sessions) == 1
    assert sink.messages[0].tls is starttls
    assert session_commands(sink.sessions[0])[0][1].endswith(b"DATA\r\n")


# -- real Postfix ----------------------------------------------------------------------------

POSTFIX_REFUSES = (
    "check_recipient_access inline:{ { refused@dest.test = 550 5.1.1 refused here }, "
    "{ full@dest.test = 452 4.2.2 mailbox full } }, permit_mynetworks, reject"
)


@pytest.fixture
def postfix_peer(lab_dir: Path, smtp_sink: SinkFactory
                 ) -> Iterator[Callable[..., tuple[PostfixRelay, Any]]]:
    """Factory: a Postfix relay (recipient refusals scripted in main.cf) onto a sink."""
    started: list[PostfixRelay] = []

    def start(**main_cf: str) -> tuple[PostfixRelay, Any]:
        sink = smtp_sink()
        postfix = PostfixRelay(
            lab_dir / f"postfix{len(started)}", port=free_port(),
            relayhost=f"[127.0.0.1]:{sink.port}", hostname="relay.test", require_auth=False,
            main_cf={"smtpd_recipient_restrictions": POSTFIX_REFUSES, **main_cf},
        )
        started.append(postfix)
        postfix.start()
        return postfix, sink

    yield start
    for postfix in started:
        postfix.stop()


def postfix_hop(postfix: PostfixRelay) -> Hop:
    return Hop("relay.test", "127.0.0.1", postfix.port, Route.DIRECT, 10)


def codes(result: TransactionResult) -> Mapping[str, int]:
    return {r: rep.code for r, rep in result.rcpt_replies.items()}


@pytest.mark.slow
async def test_postfix_answers_a_pipelined_group_reply_by_reply(
    postfix_peer: Callable[..., tuple[PostfixRelay, Any]],
) -> None:
    postfix, sink = postfix_peer()
    cfg = make_cfg()
    transport = Transport(cfg)
    env = envelope("one@dest.test", "refused@dest.test", "full@dest.test", "two@dest.test")
    try:
        result = await transport.transact(postfix_hop(postfix), env)
        none_valid = await transport.transact(
            postfix_hop(postfix), envelope("refused@dest.test", "full@dest.test"))
        last = await transport.transact(postfix_hop(postfix), envelope("three@dest.test"))
        idle = transport.idle_sessions
    finally:
        await transport.close()
    assert result.failure is None, result.transcript
    assert codes(result) == {"one@dest.test": 250, "refused@dest.test": 550,
                             "full@dest.test": 452, "two@dest.test": 250}
    assert result.rcpt_replies["refused@dest.test"].text.endswith("refused here")
    assert result.data_reply is not None and result.data_reply.code == 250
    assert sent_before_first_reply(result.transcript)[1:] == [
        "RCPT TO:<one@dest.test>", "RCPT TO:<refused@dest.test>", "RCPT TO:<full@dest.test>",
        "RCPT TO:<two@dest.test>", "DATA"]
    # No valid recipient: Postfix refuses the pipelined DATA, the session stays usable.
    assert none_valid.failure is None and none_valid.data_reply is None
    assert codes(none_valid) == {"refused@dest.test": 550, "full@dest.test": 452}
    assert any(line.startswith("<<< 554") for line in none_valid.transcript)
    assert last.failure is None and last.data_reply is not None and idle == 1
    assert sink.wait_for(2, timeout=30), postfix.log_text()
    assert sorted(m.rcpt_tos for m in sink.messages) == [
        ("one@dest.test", "two@dest.test"), ("three@dest.test",)]


@pytest.mark.slow
async def test_postfix_without_pipelining_gets_one_command_at_a_time(
    postfix_peer: Callable[..., tuple[PostfixRelay, Any]],
) -> None:
    postfix, sink = postfix_peer(smtpd_discard_ehlo_keywords="pipelining")
    result = await send(make_cfg(), postfix_hop(postfix),
                        envelope("one@dest.test", "refused@dest.test", "two@dest.test"))
    assert result.failure is None, result.transcript
    assert codes(result) == {"one@dest.test": 250, "refused@dest.test": 550,
                             "two@dest.test": 250}
    assert len(sent_before_first_reply(result.transcript)) == 1
    assert sink.wait_for(1, timeout=30), postfix.log_text()
