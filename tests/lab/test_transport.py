"""The SMTP transport against a real (scripted aiosmtpd) server on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from deliverd.config.convert import config_from_spec
from deliverd.config.model import Config, Credentials
from deliverd.core.outcomes import Envelope, Hop, Route, Stage
from deliverd.smtp.transport import CACHED_CONNECT_ERROR, Transport
from deliverd.spec.normalise import normalise
from tests.fixtures.smtp_sink import (
    S421_CLOSING,
    S451_LATER,
    S550_NO_USER,
    S554_NO_SERVICE,
    S554_REJECTED,
    SinkFactory,
    free_port,
)

pytestmark = pytest.mark.integration

OWN_NAME = "deliverd.test"
PASSWORD = "s3cr3t-Pa55word!"
BODY = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"


def make_cfg(
    routing: dict[str, Any] | None = None, limits: dict[str, Any] | None = None
) -> Config:
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": OWN_NAME},
        "timeouts": {"connect": "1s", "greeting": "1s", "command": "1s", "data_response": "1s"},
        "routing": routing or {},
        "limits": limits or {},
    }
    return config_from_spec(normalise(spec))


def smarthost_cfg(port: int, **smarthost: Any) -> Config:
    return make_cfg({"mode": "smarthost", "smarthost": {"host": "smtp.test", "port": port,
                                                         **smarthost}})


def direct(sink: Any, host: str = "mx1.test") -> Hop:
    return Hop(host, sink.host, sink.port, Route.DIRECT, 10)


def relay(sink: Any, host: str = "smtp.test") -> Hop:
    return Hop(host, sink.host, sink.port, Route.SMARTHOST)


def envelope(*recipients: str, data: bytes = BODY, **kw: Any) -> Envelope:
    return Envelope("a@src.test", recipients or ("b@dst.test",), data, **kw)


async def send(cfg: Config, hop: Hop, env: Envelope, **kw: Any) -> Any:
    transport = Transport(cfg)
    try:
        return await transport.transact(hop, env, **kw)
    finally:
        await transport.close()


# -- plain delivery ------------------------------------------------------------------------


async def test_all_recipients_go_in_one_transaction(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test", "y@dst.test"))
    assert result.failure is None
    assert result.data_reply is not None and result.data_reply.code == 250
    assert {r: rep.code for r, rep in result.rcpt_replies.items()} == {
        "x@dst.test": 250, "y@dst.test": 250}
    assert sink.wait_for(1)
    [message] = sink.messages
    assert message.rcpt_tos == ("x@dst.test", "y@dst.test")
    assert message.data.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")
    assert any(o.startswith("SIZE=") for o in message.mail_options)


async def test_rcpt_5xx_for_one_recipient_others_still_get_data(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(rcpt={"bad@dst.test": S550_NO_USER})
    result = await send(make_cfg(), direct(sink), envelope("bad@dst.test", "good@dst.test"))
    assert result.failure is None and not result.aborted
    bad = result.rcpt_replies["bad@dst.test"]
    assert (bad.code, bad.enhanced) == (550, "5.1.1")
    assert result.data_reply is not None and result.data_reply.code == 250
    assert sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ("good@dst.test",)


async def test_abort_on_rcpt_5xx_sends_rset_and_no_data(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(rcpt={"bad@dst.test": S550_NO_USER})
    cfg = make_cfg({"abort_on_rcpt_5xx": True})
    result = await send(cfg, direct(sink), envelope("bad@dst.test", "good@dst.test"))
    assert result.aborted and result.failure is None and result.data_reply is None
    assert result.rcpt_replies["good@dst.test"].code == 250
    commands = sink.sessions[0].commands
    assert "RSET" in commands and "DATA" not in commands
    assert sink.messages == []


async def test_no_recipient_accepted_sends_rset_and_no_data(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(rcpt={"bad@dst.test": S550_NO_USER, "full@dst.test": "452 4.2.2 full"})
    result = await send(make_cfg(), direct(sink), envelope("bad@dst.test", "full@dst.test"))
    assert result.failure is None and result.data_reply is None and not result.aborted
    assert [r.code for r in result.rcpt_replies.values()] == [550, 452]
    commands = sink.sessions[0].commands
    assert "RSET" in commands and "DATA" not in commands


# -- greeting, connect, timeouts -------------------------------------------------------------


@pytest.mark.parametrize(("banner", "temporary"), [(S421_CLOSING, True), (S554_NO_SERVICE, False)])
async def test_negative_greeting_is_a_greeting_failure(
    smtp_sink: SinkFactory, banner: str, temporary: bool
) -> None:
    sink = smtp_sink(greeting=banner)
    result = await send(make_cfg(), direct(sink), envelope())
    failure = result.failure
    assert failure is not None and failure.stage is Stage.GREETING
    assert failure.reply is not None and failure.reply.code == int(banner[:3])
    assert failure.temporary is temporary
    assert result.transcript[0].startswith(f"<<< {banner[:3]}")
    assert not any("MAIL" in c for c in sink.sessions[0].commands)


async def test_connection_refused_is_a_connect_failure() -> None:
    port = free_port(["127.0.0.1"])
    hop = Hop("mx1.test", "127.0.0.1", port, Route.DIRECT)
    result = await send(make_cfg(), hop, envelope())
    assert result.failure is not None
    assert (result.failure.stage, result.failure.error, result.failure.status) == (
        Stage.CONNECT, "Connection refused", "4.4.1")


async def test_connection_failure_is_cached_until_expiry() -> None:
    port = free_port(["127.0.0.1"])
    hop = Hop("mx1.test", "127.0.0.1", port, Route.DIRECT)
    transport = Transport(make_cfg(limits={"connection_failure_cache": "1s"}))
    try:
        first = await transport.transact(hop, envelope())
        second = await transport.transact(hop, envelope())
        assert first.failure is not None and first.failure.error == "Connection refused"
        assert second.failure is not None and second.failure.error == CACHED_CONNECT_ERROR
        assert second.failure.stage is Stage.CONNECT
        await asyncio.sleep(1.1)
        third = await transport.transact(hop, envelope())
        assert third.failure is not None and third.failure.error == "Connection refused"
    finally:
        await transport.close()


@pytest.mark.parametrize(
    ("stall", "stage"),
    [({"greeting": 5}, Stage.GREETING), ({"rcpt": 5}, Stage.RCPT), ({"dot": 5}, Stage.DATA)],
)
async def test_stalled_server_times_out_within_the_configured_timeout(
    smtp_sink: SinkFactory, stall: dict[str, float], stage: Stage
) -> None:
    sink = smtp_sink(stall=stall)
    started = time.monotonic()
    result = await send(make_cfg(), direct(sink), envelope())
    assert time.monotonic() - started < 3
    assert result.failure is not None and result.failure.stage is stage
    assert result.failure.temporary and "timeout" in result.failure.error


async def test_connection_dropped_mid_data_is_a_temporary_data_failure(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(drop="body")
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test"))
    failure = result.failure
    assert failure is not None and failure.stage is Stage.DATA
    assert failure.temporary and failure.status == "4.4.2" and failure.reply is None
    assert result.rcpt_replies["x@dst.test"].code == 250
    assert sink.messages == []


@pytest.mark.parametrize(
    ("script", "stage", "code"),
    [
        ({"mail": S451_LATER}, Stage.MAIL, 451),
        ({"mail": "553 5.7.1 sender rejected"}, Stage.MAIL, 553),
        ({"data_start": "451 4.3.0 not now"}, Stage.DATA, 451),
        ({"data": "452 4.3.1 insufficient storage"}, Stage.DATA, 452),
        ({"data": S554_REJECTED}, Stage.DATA, 554),
    ],
)
async def test_mail_or_data_refusal_is_a_failure_with_the_reply(
    smtp_sink: SinkFactory, script: dict[str, str], stage: Stage, code: int
) -> None:
    sink = smtp_sink(**script)
    result = await send(make_cfg(), direct(sink), envelope("x@dst.test"))
    failure = result.failure
    assert failure is not None and failure.stage is stage
    assert failure.reply is not None and failure.reply.code == code
    assert failure.temporary is (code < 500)
    assert failure.status[0] == str(code)[0]
    if stage is Stage.DATA:
        assert result.rcpt_replies["x@dst.test"].code == 250
        assert result.data_reply is None


async def test_ehlo_refused_with_5xx_falls_back_to_helo(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(ehlo="502 5.5.1 EHLO not implemented")
    result = await send(make_cfg(), direct(sink), envelope())
    assert result.failure is None, result.failure
    assert sink.sessions[0].commands[:2] == [f"EHLO {OWN_NAME}", f"HELO {OWN_NAME}"]
    assert sink.wait_for(1)
    assert sink.messages[0].mail_options == ()  # no ESMTP parameters after HELO


async def test_greeting_with_our_own_name_is_a_loop(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(greeting=f"220 {OWN_NAME} ESMTP")
    result = await send(make_cfg(), direct(sink), envelope())
    failure = result.failure
    assert failure is not None and failure.loop
    assert (failure.stage, failure.status, failure.temporary) == (Stage.GREETING, "5.4.6", False)
    assert "EHLO" not in " ".join(sink.sessions[0].commands)


@pytest.mark.parametrize(
    ("stage", "kind"),
    [("greeting", "text"), ("ehlo", "code"), ("mail", "text"), ("rcpt", "huge"),
     ("ehlo", "continuation"), ("dot", "text")],
)
async def test_garbage_replies_end_in_a_failure_not_a_crash(
    smtp_sink: SinkFactory, stage: str, kind: str
) -> None:
    sink = smtp_sink(garbage=stage, garbage_kind=kind)
    started = time.monotonic()
    result = await send(make_cfg(), direct(sink), envelope())
    assert time.monotonic() - started < 5
    assert result.failure is not None and result.failure.temporary
    assert len(result.failure.error) <= 200
    assert all(len(line) <= 512 for line in result.transcript)


# -- SMTPUTF8 and 8BITMIME -------------------------------------------------------------------


async def test_smtputf8_required_but_not_offered_fails_without_mail(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(smtputf8=False)
    result = await send(make_cfg(), direct(sink), envelope("jörg@dst.test", smtputf8=True))
    failure = result.failure
    assert failure is not None
    assert (failure.stage, failure.status, failure.temporary) == (Stage.MAIL, "5.6.7", False)
    assert "SMTPUTF8 required but not offered by" in failure.error
    assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)


async def test_smtputf8_and_8bitmime_parameters_sent_when_offered(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink()
    data = "Subject: grüße\r\n\r\nbody\r\n".encode()
    result = await send(make_cfg(), direct(sink), envelope("jörg@dst.test", data=data,
                                                           smtputf8=True))
    assert result.failure is None, result.failure
    assert sink.wait_for(1)
    message = sink.messages[0]
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(message.mail_options)
    assert message.rcpt_tos == ("jörg@dst.test",)
    assert message.data == data


async def test_8bit_message_is_sent_anyway_without_8bitmime(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(eightbitmime=False)
    data = "Subject: x\r\n\r\ncafé\r\n".encode()
    result = await send(make_cfg(), direct(sink), envelope(data=data))
    assert result.failure is None, result.failure
    assert sink.wait_for(1)
    assert not any(o.startswith("BODY") for o in sink.messages[0].mail_options)


# -- TLS -------------------------------------------------------------------------------------


async def test_direct_delivery_uses_starttls_when_offered(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=True)
    result = await send(make_cfg(), direct(sink, host="unrelated.test"), envelope())
    assert result.failure is None, result.failure
    assert sink.wait_for(1) and sink.messages[0].tls
    assert ">>> STARTTLS" in result.transcript


async def test_direct_tls_handshake_failure_retries_once_in_clear(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(starttls=True, drop="handshake")
    result = await send(make_cfg(), direct(sink), envelope())
    assert result.failure is None, result.failure
    assert sink.wait_for(1) and not sink.messages[0].tls
    assert len(sink.sessions) == 2
    assert "STARTTLS" not in sink.sessions[1].commands


async def test_required_starttls_not_offered_fails_without_mail(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=False)
    result = await send(smarthost_cfg(sink.port, tls="starttls"), relay(sink), envelope())
    failure = result.failure
    assert failure is not None
    assert (failure.stage, failure.temporary, failure.status) == (Stage.STARTTLS, True, "4.7.0")
    assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)
    assert len(sink.sessions) == 1  # never retried in clear


async def test_required_starttls_handshake_failure_never_falls_back(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink(starttls=True, drop="handshake")
    cfg = smarthost_cfg(sink.port, tls="starttls", verify_tls=False)
    result = await send(cfg, relay(sink), envelope())
    assert result.failure is not None and result.failure.stage is Stage.STARTTLS
    assert result.failure.temporary
    assert len(sink.sessions) == 1 and sink.messages == []


async def test_unknown_ca_fails_verification(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=True)
    result = await send(smarthost_cfg(sink.port, tls="starttls"), relay(sink), envelope())
    failure = result.failure
    assert failure is not None and failure.stage is Stage.STARTTLS
    assert failure.temporary and failure.status == "4.7.5"
    assert "certificate verify failed" in failure.error
    assert sink.messages == [] and len(sink.sessions) == 1


async def test_private_ca_file_verifies_the_smarthost(
    smtp_sink: SinkFactory, ca_file: str
) -> None:
    sink = smtp_sink(starttls=True)
    cfg = smarthost_cfg(sink.port, tls="starttls", ca_file=ca_file)
    result = await send(cfg, relay(sink), envelope())
    assert result.failure is None, result.failure
    assert sink.wait_for(1) and sink.messages[0].tls


async def test_certificate_for_another_name_fails_hostname_check(
    smtp_sink: SinkFactory, ca_file: str
) -> None:
    sink = smtp_sink(starttls=True)
    cfg = smarthost_cfg(sink.port, tls="starttls", ca_file=ca_file)
    result = await send(cfg, relay(sink, host="elsewhere.test"), envelope())
    assert result.failure is not None and result.failure.stage is Stage.STARTTLS
    assert sink.messages == []


async def test_implicit_tls_smarthost(smtp_sink: SinkFactory, ca_file: str) -> None:
    sink = smtp_sink(implicit_tls=True)
    cfg = smarthost_cfg(sink.port, tls="tls", ca_file=ca_file)
    result = await send(cfg, relay(sink), envelope())
    assert result.failure is None, result.failure
    assert sink.wait_for(1) and sink.messages[0].tls
    assert "STARTTLS" not in sink.sessions[0].commands


# -- AUTH ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_over_starttls_succeeds(
    smtp_sink: SinkFactory, ca_file: str, mechanism: str
) -> None:
    sink = smtp_sink(starttls=True, auth={"relay": PASSWORD}, auth_mechanisms=(mechanism,),
                     require_auth=True)
    cfg = smarthost_cfg(sink.port, ca_file=ca_file, auth={"username": "relay",
                                                           "password": PASSWORD})
    creds = Credentials("relay", PASSWORD)
    result = await send(cfg, relay(sink), envelope(), credentials=creds)
    assert result.failure is None, result.failure
    assert sink.wait_for(1)
    assert sink.messages[0].user == "relay" and sink.messages[0].tls
    assert f">>> AUTH {mechanism} <redacted>" in result.transcript
    assert PASSWORD not in "\n".join(result.transcript)


async def test_wrong_password_is_a_temporary_auth_failure(
    smtp_sink: SinkFactory, ca_file: str
) -> None:
    sink = smtp_sink(starttls=True, auth={"relay": "right"}, require_auth=True)
    cfg = smarthost_cfg(sink.port, ca_file=ca_file)
    result = await send(cfg, relay(sink), envelope(), credentials=Credentials("relay", PASSWORD))
    failure = result.failure
    assert failure is not None and failure.stage is Stage.AUTH
    assert failure.temporary and failure.status.startswith("4.7.")
    assert failure.reply is not None and failure.reply.code == 535
    assert sink.messages == []
    everything = "\n".join([*result.transcript, failure.error, repr(result), str(failure)])
    assert PASSWORD not in everything


async def test_auth_refused_without_tls(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(auth={"relay": PASSWORD}, auth_require_tls=False)
    cfg = smarthost_cfg(sink.port, tls="none")
    result = await send(cfg, relay(sink), envelope(), credentials=Credentials("relay", PASSWORD))
    failure = result.failure
    assert failure is not None and failure.stage is Stage.AUTH
    assert (failure.status, failure.error) == ("4.7.0", "refusing to send credentials without TLS")
    assert not any(c.startswith("AUTH") for c in sink.sessions[0].commands)


async def test_plaintext_auth_allowed_when_configured(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(auth={"relay": PASSWORD}, auth_require_tls=False, require_auth=True)
    cfg = smarthost_cfg(sink.port, tls="none", allow_plaintext_auth=True)
    result = await send(cfg, relay(sink), envelope(), credentials=Credentials("relay", PASSWORD))
    assert result.failure is None, result.failure
    assert sink.wait_for(1) and sink.messages[0].user == "relay"
    assert not sink.messages[0].tls
    assert PASSWORD not in "\n".join(result.transcript)


async def test_no_usable_auth_mechanism_defers(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(auth={"relay": PASSWORD})  # AUTH is only offered after STARTTLS
    cfg = smarthost_cfg(sink.port, tls="none", allow_plaintext_auth=True)
    result = await send(cfg, relay(sink), envelope(), credentials=Credentials("relay", PASSWORD))
    failure = result.failure
    assert failure is not None and failure.stage is Stage.AUTH
    assert failure.temporary and failure.status == "4.7.8"
    assert "no usable AUTH mechanism" in failure.error
    assert sink.messages == []


async def test_credentials_are_ignored_on_direct_hops(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(auth={"relay": PASSWORD}, auth_require_tls=False)
    result = await send(make_cfg(), direct(sink), envelope(),
                        credentials=Credentials("relay", PASSWORD))
    assert result.failure is None
    assert not any(c.startswith("AUTH") for c in sink.sessions[0].commands)


# -- connection reuse ------------------------------------------------------------------------


async def test_second_transaction_reuses_the_session(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    transport = Transport(make_cfg())
    try:
        first = await transport.transact(direct(sink), envelope("x@dst.test"))
        second = await transport.transact(direct(sink), envelope("y@dst.test"))
    finally:
        await transport.close()
    assert first.failure is None and second.failure is None
    assert sink.wait_for(2)
    assert len(sink.sessions) == 1
    assert sink.sessions[0].commands[-1] == "QUIT"  # close() quits idle sessions
    assert not any(line.startswith("<<< 220") for line in second.transcript)


async def test_messages_per_session_cap_opens_a_new_session(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    transport = Transport(make_cfg(limits={"messages_per_session": 2}))
    try:
        for n in range(3):
            result = await transport.transact(direct(sink), envelope(f"r{n}@dst.test"))
            assert result.failure is None
    finally:
        await transport.close()
    assert sink.wait_for(3)
    assert len(sink.sessions) == 2
    assert sink.sessions[0].commands.count("DATA") == 2
    assert sink.sessions[0].commands[-1] == "QUIT"


async def test_sessions_are_keyed_by_credentials(smtp_sink: SinkFactory) -> None:
    users = {"alice": "pw-alice-123", "bob": "pw-bob-456"}
    sink = smtp_sink(auth=users, auth_require_tls=False, require_auth=True)
    transport = Transport(smarthost_cfg(sink.port, tls="none", allow_plaintext_auth=True))
    try:
        for user in ("alice", "bob", "alice"):
            result = await transport.transact(
                relay(sink), envelope(), credentials=Credentials(user, users[user])
            )
            assert result.failure is None, result.failure
    finally:
        await transport.close()
    assert sink.wait_for(3)
    assert [m.user for m in sink.messages] == ["alice", "bob", "alice"]
    assert len(sink.sessions) == 2


async def test_session_closed_by_server_while_idle_reconnects(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(idle_timeout=0.3)
    transport = Transport(make_cfg())
    try:
        assert (await transport.transact(direct(sink), envelope())).failure is None
        await asyncio.sleep(0.6)
        result = await transport.transact(direct(sink), envelope())
    finally:
        await transport.close()
    assert result.failure is None, result.failure
    assert sink.wait_for(2) and len(sink.sessions) == 2


async def test_idle_sessions_are_closed_after_the_idle_timeout(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink()
    transport = Transport(make_cfg(), idle_timeout=0.2)
    try:
        assert (await transport.transact(direct(sink), envelope())).failure is None
        assert transport.idle_sessions == 1
        await asyncio.sleep(0.5)
        assert transport.idle_sessions == 0
        assert sink.sessions[0].commands[-1] == "QUIT"
    finally:
        await transport.close()


async def test_failed_transaction_session_is_not_reused(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(stall={"dot": 3})
    transport = Transport(make_cfg())
    try:
        result = await transport.transact(direct(sink), envelope())
        assert result.failure is not None
        assert transport.idle_sessions == 0
    finally:
        await transport.close()


async def test_per_destination_limit_bounds_concurrent_sessions(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(stall={"mail": 0.2})
    transport = Transport(make_cfg(limits={"per_destination": 2}))
    try:
        results = await asyncio.gather(
            *(transport.transact(direct(sink), envelope(f"r{n}@dst.test")) for n in range(6))
        )
    finally:
        await transport.close()
    assert all(r.failure is None for r in results)
    assert sink.wait_for(6)
    assert len(sink.sessions) == 2


async def test_update_config_makes_new_sessions_use_the_new_config(
    smtp_sink: SinkFactory,
) -> None:
    sink = smtp_sink()
    transport = Transport(make_cfg())
    try:
        assert (await transport.transact(direct(sink), envelope())).failure is None
        transport.update_config(make_cfg(routing={"abort_on_rcpt_5xx": True}))
        await asyncio.sleep(0.1)
        assert transport.idle_sessions == 0
        assert (await transport.transact(direct(sink), envelope())).failure is None
    finally:
        await transport.close()
    assert len(sink.sessions) == 2


# -- transcript ------------------------------------------------------------------------------


async def test_transcript_reads_like_postfix(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(rcpt={"bad@dst.test": S550_NO_USER})
    result = await send(make_cfg(), direct(sink), envelope("bad@dst.test", "ok@dst.test"))
    lines = result.transcript
    assert lines[0].startswith("<<< 220 sink.test")
    assert f">>> EHLO {OWN_NAME}" in lines
    assert any(line.startswith(">>> MAIL FROM:<a@src.test> SIZE=") for line in lines)
    assert ">>> RCPT TO:<bad@dst.test>" in lines
    assert "<<< 550 5.1.1 no such user" in lines
    assert lines[-1].startswith("<<< 250")


def test_sinks_share_one_port_on_different_loopback_addresses(smtp_sink: SinkFactory) -> None:
    addresses = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    port = free_port(addresses)
    sinks = [smtp_sink(address, port) for address in addresses]
    assert {(s.host, s.port) for s in sinks} == {(a, port) for a in addresses}


async def test_cancelled_transaction_leaves_no_session_behind(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(stall={"mail": 5})
    transport = Transport(make_cfg(routing=None))
    task = asyncio.create_task(transport.transact(direct(sink), envelope()))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.idle_sessions == 0
    await transport.close()
