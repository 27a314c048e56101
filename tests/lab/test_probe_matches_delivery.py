"""The probe and delivery go through one handshake: where one passes, so does the other.

Each row is a smart host scripted one way (TLS offered or not, a handshake that breaks, AUTH
in clear or not, a wrong password); the probe (``deliverd.delivery.probe``) and a delivery
(``Transport.transact``) are both run against it and must agree. The rows include the cases
where they once disagreed: an opportunistic STARTTLS whose handshake breaks (delivery retries
in clear text and delivers, so the probe must pass too).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from deliverd.config.convert import config_from_spec
from deliverd.config.model import Config
from deliverd.core.outcomes import Envelope, Hop, Route
from deliverd.delivery.probe import probe
from deliverd.dns.resolver import Addresses
from deliverd.smtp.errors import SessionError
from deliverd.smtp.handshake import Handshake, establish
from deliverd.smtp.session import SmtpSession
from deliverd.smtp.tls import ContextCache, plan_for
from deliverd.smtp.transport import Transport
from deliverd.spec.normalise import normalise
from tests.fixtures.smtp_sink import SinkFactory

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3t-Pa55word!"
AUTH = {"username": "relay", "password": PASSWORD}


class _OneAddress:
    """A resolver that finds the sink for every name."""

    async def addresses(self, name: str) -> Addresses:
        return Addresses(("127.0.0.1",))


def smarthost_cfg(port: int, **smarthost: Any) -> Config:
    spec: dict[str, Any] = {
        "version": 1,
        "host": {"name": "deliverd.test"},
        "timeouts": {"connect": "1s", "greeting": "1s", "command": "1s", "data_response": "1s"},
        "routing": {"mode": "smarthost",
                    "smarthost": {"host": "smtp.test", "port": port, **smarthost}},
    }
    return config_from_spec(normalise(spec))


async def delivered(cfg: Config, port: int) -> bool:
    smarthost = cfg.routing.smarthost
    assert smarthost is not None
    transport = Transport(cfg)
    envelope = Envelope("a@src.test", ("b@dst.test",), b"Subject: x\r\n\r\nhi\r\n")
    try:
        result = await transport.transact(
            Hop("smtp.test", "127.0.0.1", port, Route.SMARTHOST), envelope,
            credentials=smarthost.auth,
        )
    finally:
        await transport.close()
    return result.failure is None


async def probed(cfg: Config) -> bool:
    report = await probe(cfg, resolver_factory=lambda _cfg: _OneAddress())  # type: ignore[arg-type,return-value]
    return report.ok


# (sink script, smart host settings, whether both pass)
ROWS = [
    pytest.param({"starttls": True, "drop": "handshake"}, {"tls": "opportunistic"}, True,
                 id="opportunistic-handshake-breaks-retried-in-clear"),
    pytest.param({"starttls": True}, {"tls": "opportunistic", "verify_tls": False}, True,
                 id="opportunistic-starttls"),
    pytest.param({"starttls": False}, {"tls": "starttls"}, False,
                 id="required-starttls-not-offered"),
    pytest.param({"starttls": True, "drop": "handshake"},
                 {"tls": "starttls", "verify_tls": False}, False,
                 id="required-starttls-handshake-breaks"),
    pytest.param({"auth": {"relay": PASSWORD}, "auth_require_tls": False, "require_auth": True},
                 {"tls": "none", "auth": AUTH}, False,
                 id="auth-refused-without-tls"),
    pytest.param({"auth": {"relay": PASSWORD}, "auth_require_tls": False, "require_auth": True},
                 {"tls": "none", "auth": AUTH, "allow_plaintext_auth": True}, True,
                 id="plaintext-auth-allowed"),
    pytest.param({"auth": {"relay": PASSWORD}}, {"tls": "none", "auth": AUTH,
                                                 "allow_plaintext_auth": True}, False,
                 id="no-usable-auth-mechanism-in-clear"),
    pytest.param({"starttls": True, "auth": {"relay": "right"}, "require_auth": True},
                 {"tls": "starttls", "verify_tls": False, "auth": AUTH}, False,
                 id="wrong-password"),
    pytest.param({"starttls": True, "auth": {"relay": PASSWORD}, "require_auth": True},
                 {"tls": "starttls", "verify_tls": False, "auth": AUTH}, True,
                 id="auth-over-starttls"),
]


@pytest.mark.parametrize(("script", "smarthost", "passes"), ROWS)
async def test_probe_passes_exactly_where_delivery_does(
    smtp_sink: SinkFactory, script: dict[str, Any], smarthost: dict[str, Any], passes: bool,
) -> None:
    sink = smtp_sink(**script)
    cfg = smarthost_cfg(sink.port, **smarthost)
    assert await probed(cfg) is passes
    assert await delivered(cfg, sink.port) is passes


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[str, bool]] = []

    def ok(self, name: str, detail: str) -> None:
        self.steps.append((name, True))

    def fail(self, name: str, detail: str) -> None:
        self.steps.append((name, False))


async def _handshake_steps(cfg: Config, port: int) -> list[tuple[str, bool]]:
    smarthost = cfg.routing.smarthost
    assert smarthost is not None
    hop = Hop("smtp.test", "127.0.0.1", port, Route.SMARTHOST)
    session = SmtpSession(hop, cfg.host.name, cfg.timeouts)
    handshake = Handshake.for_config(plan_for(Route.SMARTHOST, cfg), smarthost.auth, cfg)
    recorder = _Recorder()
    with contextlib.suppress(SessionError):  # the failure is in the recorded steps
        await establish(session, handshake, ContextCache(), recorder)
    session.abort()
    return recorder.steps


async def test_handshake_reports_each_step_in_order(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=True, auth={"relay": PASSWORD}, require_auth=True)
    cfg = smarthost_cfg(sink.port, tls="starttls", verify_tls=False, auth=AUTH)
    assert await _handshake_steps(cfg, sink.port) == [
        ("connect", True), ("ehlo", True), ("tls", True), ("auth", True)]


async def test_handshake_reports_implicit_tls_with_the_greeting(
    smtp_sink: SinkFactory, ca_file: str
) -> None:
    sink = smtp_sink(implicit_tls=True)
    cfg = smarthost_cfg(sink.port, tls="tls", ca_file=ca_file)
    assert await _handshake_steps(cfg, sink.port) == [
        ("connect", True), ("tls", True), ("ehlo", True)]


async def test_handshake_reports_the_step_that_failed_last(smtp_sink: SinkFactory) -> None:
    sink = smtp_sink(starttls=True, auth={"relay": "right"}, require_auth=True)
    cfg = smarthost_cfg(sink.port, tls="starttls", verify_tls=False, auth=AUTH)
    assert await _handshake_steps(cfg, sink.port) == [
        ("connect", True), ("ehlo", True), ("tls", True), ("auth", False)]
